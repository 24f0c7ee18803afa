"""Tests of the ground floor: zodbblob.layout."""
