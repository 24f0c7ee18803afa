"""Tests of the ground floor, beside it: zodbblob.layout."""
