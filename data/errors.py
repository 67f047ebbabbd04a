"""The data error shared by the datasets and the tools. It lives in a module of its own so that
torch-free code (tools/check_dataset.py, data/pixels.py, data/saliency.py) can raise it;
``data.datasets.DataError`` is the same class."""


from utils.errors import UserError


class DataError(UserError):
    """A data file is missing, unreadable or inconsistent; the message names the file and the fix."""
