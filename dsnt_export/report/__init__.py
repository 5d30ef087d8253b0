"""dsnt_export/report."""
