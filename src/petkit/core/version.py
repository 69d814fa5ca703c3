"""The library version, readable from every layer (the facade re-exports it)."""
__version__ = "0.1.0"
