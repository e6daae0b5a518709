"""Errors a user can cause. Every message names the file involved and the fix."""

from __future__ import annotations


class DefectscopeError(Exception):
    """Base class for every error defectscope raises on purpose."""


class DataError(DefectscopeError):
    """An image, mask or dataset folder cannot be used as it is."""


class WeightsError(DefectscopeError):
    """Pretrained weights are missing or do not fit the requested backbone."""


class ModelFileError(DefectscopeError):
    """A model file is missing, truncated, tampered with or not a defectscope file."""


class ConfigError(DefectscopeError):
    """An option has a value that cannot work (unknown method, bad ratio, ...)."""
