"""converters/common."""
