"""The one base class of user errors.

A ``UserError`` is something the user can fix: a bad flag, a missing, malformed or mismatched
file, an output folder that holds another run. Its message is one line that names the file or
the flag and says what to do; ``utils.cli.run_cli`` prints it without a traceback and exits with
status 2. Every module raises its own subclass (``DataError``, ``WeightsError``, ...), so a
caller can still tell them apart. Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the file or flag and the fix."""


class WeightsError(UserError):
    """A weights or checkpoint file that cannot be read or does not fit the network (the message
    says why). Defined here, torch-free, so that utils/torchfile.py (checkpoints) and
    network/ (weights, the numpy-only MXNet reader) raise the same class."""


# How many offending files or ids a one-line message lists before "... and N more".
SHOW = 5


def examples(items, n: int = SHOW) -> str:
    """The first ``n`` of ``items`` for a one-line message: "a; b; c; d; e; ... and 7 more"."""
    items = list(items)
    text = "; ".join(str(x) for x in items[:n])
    return text + (f"; ... and {len(items) - n} more" if len(items) > n else "")
