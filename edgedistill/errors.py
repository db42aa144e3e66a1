"""Typed errors of the workstation side. Messages name the file or key and say what to do."""


class EdgedistillError(Exception):
    """Base of every error raised on purpose; the CLI prints these without a traceback."""


class RecipeError(EdgedistillError):
    """A recipe file or a --set override is invalid."""


class DataError(EdgedistillError):
    """The data folder or source cannot be used as given."""


class TeacherTooWeakError(EdgedistillError):
    """The teacher is under the accuracy floor: a student would inherit its mistakes."""


class NonFiniteLossError(EdgedistillError):
    """A training loss became NaN or infinite."""


class CheckpointError(EdgedistillError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class StageMissingError(EdgedistillError):
    """A stage needs the output of an earlier stage that has not run."""


class ExportError(EdgedistillError):
    """The model could not be exported, or its exported copy disagrees with it."""
