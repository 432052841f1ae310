"""Import shim standing in for torchvision in tests; see ../README.md."""

__version__ = "0.0.0+shim"
