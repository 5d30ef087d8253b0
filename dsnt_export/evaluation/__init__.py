"""dsnt_export/evaluation."""
