"""Error classes shared by the weight readers.

WeightsError is defined in utils/errors.py (torch-free) and re-exported here: the MXNet reader
(numpy only, no torch) derives MXNetParamsError from it, and utils/torchfile.py (the safe torch
file reader of weights and resume checkpoints) raises it, so an unreadable file is reported the
same way wherever it is read.
"""
from utils.errors import WeightsError  # noqa: F401 (re-exported)


class MissingWeightsFile(WeightsError, FileNotFoundError):
    """A weights path that does not exist (also a FileNotFoundError for callers that expect one)."""
