"""The package version (one place: pyproject.toml's is kept equal by tests/test_layers.py)."""
__version__ = "0.1.0"
