"""Errors a user can fix: the entry points print them as one line, without a traceback."""


class DetectorError(Exception):
    """Base class of errors caused by the user's input rather than by a bug."""


class ConfigError(DetectorError):
    """A setting is out of range or names something that does not exist."""


class DataError(DetectorError):
    """A data folder is missing, empty or laid out differently than expected."""


class CheckpointError(DetectorError):
    """A checkpoint is missing, unreadable, untrusted or of another model."""


class NonFiniteLossError(DetectorError):
    """The loss became NaN or infinite: training stopped before it reached the weights."""


def ckpt_not_set(setting: str = "ckpt") -> str:
    """The one wording of a command run without its checkpoint."""
    return f"{setting} is not set: pass {setting}=PATH to a .ckpt file written by train.py"
