"""Tests of the client cache, beside it: zodbblob.cache."""
