"""Error classes shared by the weight readers.

WeightsError lives here, not in network/weights.py, so that the MXNet reader (numpy only, no torch)
can derive MXNetParamsError from it: entry points that report an unreadable weights file as one
line (they catch WeightsError) then report an unreadable .params file the same way.
"""


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the network (the message says why)."""
