"""The one narrow exception hierarchy of robustpart.

Every error raised for bad user input is a `RobustpartError`; its message says what was wrong and what
to do. The CLI prints it as one line (`robustpart: error: ...`) and exits 2. Anything else escaping is a
bug; the CLI still reports it in one line (exit 1) and shows the traceback only with `-v`.
"""


class RobustpartError(Exception):
    """Base of every error robustpart raises on purpose."""


class UsageError(RobustpartError):
    """The command line is malformed: an unknown option, a value of the wrong type, a missing argument."""


class ModelError(RobustpartError):
    """The model cannot be found, loaded or given weights."""


class WeightsError(ModelError):
    """Weights were asked for that cannot be obtained (no file, no internet, wrong shapes)."""


class GraphError(RobustpartError):
    """The traced model has an op the compiler cannot place."""


class DataError(RobustpartError):
    """Input data is missing, unreadable or does not match the model's input spec."""


class ConfigError(RobustpartError):
    """An option names something that does not exist (a policy, a criterion, a mode) or is out of range."""


class PlanError(RobustpartError):
    """A plan, or what was asked of one (boards, thresholds, replicated units), is invalid for the model."""


class BundleError(RobustpartError):
    """A bundle directory is missing, incomplete or inconsistent."""


class MeshError(RobustpartError):
    """The board mesh cannot be set up as asked: an inventory, an address, keys, a peer that refuses."""


class Terminated(SystemExit):
    """The process got SIGTERM while it was writing a bundle (see `bundle.write_atomically`): raised from
    the signal handler so that every cleanup on the way out runs. Like SystemExit it is not an `Exception`,
    so no `except Exception` swallows it, and left uncaught it ends the process with status 128 + 15 and no
    traceback."""

    def __init__(self, signum: int = 15):
        super().__init__(128 + signum)
        self.signum = signum
