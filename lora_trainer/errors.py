"""Errors a user can act on.

Each carries one readable line (what, where, what to do). Front ends print ``str(error)``
and never a traceback; anything that is not a ``UserError`` is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, has the wrong type or is out of range."""


class DatasetError(UserError):
    """The dataset folder cannot be used as it is."""


class ModelError(UserError):
    """The base model is missing, unreadable or of an unsupported family."""


class TrainingError(UserError):
    """Training cannot go on (for example the loss became NaN)."""


class StorageError(UserError):
    """A file could not be written (disk full, permissions, a bad output name)."""
