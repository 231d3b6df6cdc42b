"""Errors raised by rulewriter.

Every error a user can cause derives from :class:`RulewriterError`, so a caller can catch one type. Each
subclass also derives from the built-in error it refines (``ValueError``, ``KeyError``...), so code that
already catches those keeps working.
"""
from __future__ import annotations


class RulewriterError(Exception):
    """Base class of every error rulewriter raises on bad input."""


class LayerError(RulewriterError, KeyError):
    """A layer name does not exist in the model, or the layer cannot be viewed as a memory."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class MaskError(RulewriterError, ValueError):
    """A mask is empty, of the wrong shape, or cannot be read."""


class ImageLoadError(RulewriterError, ValueError):
    """An image file is missing, corrupt or not an image."""


class StatsError(RulewriterError, ValueError):
    """Statistics are missing, mismatched, singular, or contain NaNs."""


class EditError(RulewriterError, ValueError):
    """An edit cannot be built, loaded or applied."""


class ModelError(RulewriterError, ValueError):
    """A model name is unknown or its weights cannot be found locally."""
