"""The operator's tools: verify, migrate, export/import, backup/restore."""
