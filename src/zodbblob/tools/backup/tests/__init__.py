"""Tests of backup and restore, beside them: zodbblob.tools.backup."""
