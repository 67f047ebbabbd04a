"""Error classes shared by the weight readers.

WeightsError lives here, not in network/weights.py, so that the MXNet reader (numpy only, no torch)
can derive MXNetParamsError from it: an unreadable .params file is reported like any other
unreadable weights file.
"""
from utils.errors import UserError


class WeightsError(UserError):
    """A weights file that cannot be read or does not fit the network (the message says why)."""


class MissingWeightsFile(WeightsError, FileNotFoundError):
    """A weights path that does not exist (also a FileNotFoundError for callers that expect one)."""
