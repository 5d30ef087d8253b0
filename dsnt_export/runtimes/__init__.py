"""dsnt_export/runtimes."""
