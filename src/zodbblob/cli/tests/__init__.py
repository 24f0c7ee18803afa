"""Tests of the command line, beside it: zodbblob.cli."""
