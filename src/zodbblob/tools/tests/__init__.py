"""Tests of the operator's tools, beside them: zodbblob.tools."""
