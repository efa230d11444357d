"""The version string, in a leaf module so that every layer may record it (manifests, cards)."""

__version__ = "0.1.0"
