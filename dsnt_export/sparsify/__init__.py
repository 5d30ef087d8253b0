"""dsnt_export/sparsify."""
