"""dsnt_export/refine."""
