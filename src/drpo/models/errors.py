"""The models layer's error: a model named in the config that cannot be loaded."""
from __future__ import annotations


class ModelLoadError(ValueError):
    """The model named in the config cannot be loaded; the message says why and what to do."""
