"""converters/checkers."""
