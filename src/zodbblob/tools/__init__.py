"""The operator's tools: verify, recover, migrate, export/import, backup/restore."""
