"""The package version and the node wire protocol's version: a leaf every package may import."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
