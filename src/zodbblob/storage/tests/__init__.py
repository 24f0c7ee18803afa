"""Tests of the storage wing, beside it: zodbblob.storage."""
