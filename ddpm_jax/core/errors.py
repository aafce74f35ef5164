"""The one error type of a refusal: something the user can change (a config field, a flag, a
path) is wrong, and the message says what to change.

Every check that refuses input raises a `UserError` (a `ValueError`); the commands turn it
into one line on the console (`ddpm_jax.console`), with no traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot work; `str(error)` says what to change."""


class MissingError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist, or does not hold what it should."""


class DataError(UserError):
    """Raised before training when the configured data cannot be read."""
