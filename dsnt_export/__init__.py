"""dsnt-export: DSnoT N:M sparsification, mask validation and runtime export for LLMs."""

__version__ = "0.1.0"
