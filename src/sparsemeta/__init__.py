"""sparsemeta: lottery tickets in meta-learned models."""

__version__ = "0.1.0"
