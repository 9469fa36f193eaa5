"""The one narrow exception hierarchy of robustpart.

Every error raised for bad user input is a `RobustpartError`; its message says what was wrong and what
to do. The CLI prints it as one line and exits non-zero. Anything else escaping is a bug.
"""


class RobustpartError(Exception):
    """Base of every error robustpart raises on purpose."""


class ModelError(RobustpartError):
    """The model cannot be found, loaded or given weights."""


class WeightsError(ModelError):
    """Weights were asked for that cannot be obtained (no file, no internet, wrong shapes)."""


class GraphError(RobustpartError):
    """The traced model has an op the compiler cannot place."""


class DataError(RobustpartError):
    """Input data is missing, unreadable or does not match the model's input spec."""


class PlanError(RobustpartError):
    """A plan (or the request for one) is invalid."""


class BundleError(RobustpartError):
    """A bundle directory is missing, incomplete or inconsistent."""
