"""The models layer's error: a model named in the config that cannot be loaded."""
from __future__ import annotations

from drpo.utils.errors import UserError


class ModelLoadError(UserError, ValueError):
    """The model named in the config cannot be loaded; the message says why and what to do."""
