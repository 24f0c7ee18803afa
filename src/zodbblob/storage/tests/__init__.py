"""Tests of the storage wing: zodbblob.storage."""
