"""Read MXNet ``.params`` files (``NDArray::Save`` lists) with numpy alone.

MXNet no longer imports beside numpy 2, and the ImageNet ResNet-38 weights exist only in this
format. Layout (apache/mxnet src/ndarray/ndarray.cc NDArray::Save; little-endian throughout)::

    uint64 magic 0x112, uint64 reserved
    uint64 N, then N NDArray records
    uint64 K (0 or N), then K names: uint64 length + bytes ("arg:<name>" / "aux:<name>")

Each record starts with a uint32 that selects its format:

    0xF993FAC9 (V2) / 0xF993FACA (V3): int32 stype; [storage TShape if sparse]; TShape;
        context (2 x int32); int32 type_flag; [sparse: nad x (int32 aux_type, TShape)];
        data; [sparse: aux data]
    0xF993FAC8 (V1): TShape; context; int32 type_flag; data
    anything else (legacy, pre-2017): that value is ndim; ndim x uint32 dims; context;
        int32 type_flag; data

TShape = int32 ndim + ndim x int64. An empty shape (ndim 0; in V3 an unknown shape, ndim or a
dim of -1) ends the record: the array is "none" and is returned as an empty float32 array. In V3,
ndim 0 is a scalar. Sparse arrays (row_sparse, csr) are returned densified.

A file that cannot be read gives one MXNetParamsError line naming the file and the fix. The reader
tells two faults apart, because a wrong diagnosis sends the user the wrong way: "truncated" (every
header read so far is plausible, the data ends early: "N of at least M bytes") and "corrupt" (a
header field that no real file has: more dimensions than MAX_NDIM, a dimension below -1, a record or
name larger than the whole file, an unknown dtype or storage type).
"""
from __future__ import annotations

import logging
import math
import mmap
import struct
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from network.errors import WeightsError
from utils.io import describe_file_start

logger = logging.getLogger(__name__)

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA

# mshadow type_flag → numpy dtype (little-endian). 12 (bfloat16) has no numpy dtype: read as
# uint16 and widened to float32.
TYPE_FLAGS = {0: "<f4", 1: "<f8", 2: "<f2", 3: "u1", 4: "<i4", 5: "i1", 6: "<i8", 7: "?",
              8: "<i2", 9: "<u2", 10: "<u4", 11: "<u8", 12: "<u2"}
BFLOAT16 = 12
STYPE_NAMES = {0: "dense", 1: "row_sparse", 2: "csr"}
NUM_AUX = {0: 0, 1: 1, 2: 2}
# More dimensions than any MXNet array has (mshadow's static shapes stop far below): a larger ndim
# is a corrupt header, not a large array.
MAX_NDIM = 32
FIX = "download or copy it again"


class MXNetParamsError(WeightsError):
    """A file that is not a readable MXNet NDArray list (one line: the file, why, and the fix).
    A WeightsError (so a ValueError), so callers that report unreadable weights report it too."""


class _Reader:
    """Sequential little-endian reader over a buffer, with errors that say where it stopped."""

    def __init__(self, buf, source: str, shapes_only: bool = False):
        self.buf, self.pos, self.source = buf, 0, source
        self.size = len(buf)
        self.what = "the header"
        self.shapes_only = shapes_only  # skip the data: arrays are zero-stride placeholders

    def corrupt(self, msg: str) -> MXNetParamsError:
        return MXNetParamsError(f"{self.source}: corrupt: {msg} (at byte {self.pos} of {self.size}, "
                                f"in {self.what}); {FIX}")

    def truncated(self, needed: int) -> MXNetParamsError:
        return MXNetParamsError(f"{self.source}: truncated: {self.size} of at least {needed} bytes "
                                f"(the file ends in {self.what}); {FIX}")

    def take(self, n: int, sized: Optional[str] = None) -> int:
        """Advance by n bytes. ``sized`` names a block whose length came from the file (an array,
        a name): one larger than the whole file cannot be real, so it is a corrupt header."""
        if sized is not None and n > self.size:
            raise self.corrupt(f"{sized} of {n} bytes in a file of {self.size} bytes")
        if self.pos + n > self.size:
            raise self.truncated(self.pos + n)
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def i32(self) -> int:
        return self.unpack("<i")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def check_ndim(self, ndim: int) -> None:
        if ndim > MAX_NDIM:
            raise self.corrupt(f"a shape with {ndim} dimensions (at most {MAX_NDIM} are plausible)")

    def check_dims(self, shape: Tuple[int, ...]) -> None:
        # -1 is MXNet's "unknown" (V3); anything below it is no shape at all.
        bad = [d for d in shape if d < -1]
        if bad:
            raise self.corrupt(f"dimension {bad[0]} in shape {shape}")

    def tshape(self) -> Optional[Tuple[int, ...]]:
        """nnvm TShape: int32 ndim + ndim x int64. Returns None for ndim -1 (unknown, V3)."""
        ndim = self.i32()
        if ndim == -1:
            return None
        if ndim < -1:
            raise self.corrupt(f"a shape with {ndim} dimensions")
        self.check_ndim(ndim)
        shape = tuple(self.unpack(f"<{ndim}q")) if ndim else ()
        self.check_dims(shape)
        return shape

    def array(self, type_flag: int, shape: Tuple[int, ...]) -> np.ndarray:
        if type_flag not in TYPE_FLAGS:
            raise self.corrupt(f"unknown dtype type_flag {type_flag} (known: {sorted(TYPE_FLAGS)})")
        if any(d < 0 for d in shape):
            raise self.corrupt(f"negative dimension in shape {shape}")
        dtype = np.dtype(TYPE_FLAGS[type_flag])
        count = math.prod(shape)  # Python ints: a corrupt shape must not wrap around in int64
        start = self.take(count * dtype.itemsize, f"an array of shape {shape} ({dtype.name})")
        if self.shapes_only:  # the right shape and no memory: nothing of the data is read
            return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
        # Copy, so the result neither pins the (possibly memory-mapped) file nor is read-only.
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
        if type_flag == BFLOAT16:
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.reshape(shape)


def _empty() -> np.ndarray:
    return np.zeros((0,), dtype=np.float32)


def _read_record(r: _Reader, stats: Counter) -> np.ndarray:
    magic = r.u32()
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        v3 = magic == NDARRAY_V3_MAGIC
        stats["V3" if v3 else "V2"] += 1
        stype = r.i32()
        if stype not in NUM_AUX:
            raise r.corrupt(f"unknown storage type {stype} (0 dense, 1 row_sparse, 2 csr)")
        nad = NUM_AUX[stype]
        storage_shape = r.tshape() if nad else None
        shape = r.tshape()
        if shape is None or any(d < 0 for d in shape) or (not v3 and len(shape) == 0):
            return _empty()  # V3 unknown shape / V2 ndim 0: a "none" array, the record ends here
        r.unpack("<ii")  # context (dev_type, dev_id): irrelevant, everything loads on the CPU
        type_flag = r.i32()
        if nad == 0:
            return r.array(type_flag, shape)
        aux = [(r.i32(), r.tshape()) for _ in range(nad)]
        values = r.array(type_flag, storage_shape or (0,))
        aux_data = [r.array(t, s or (0,)) for t, s in aux]
        stats[STYPE_NAMES[stype]] += 1
        if r.shapes_only:
            return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
        return _densify(stype, shape, values, aux_data, r)
    if magic == NDARRAY_V1_MAGIC:
        stats["V1"] += 1
        ndim = r.u32()
        r.check_ndim(ndim)
        shape = tuple(r.unpack(f"<{ndim}q")) if ndim else ()
        r.check_dims(shape)
    else:
        # Legacy (pre-2017): the first word is ndim, dims are uint32.
        stats["legacy"] += 1
        ndim = magic
        if ndim > MAX_NDIM:
            raise r.corrupt(f"a record starting with 0x{magic:08X}, neither a format magic "
                            "nor a plausible legacy ndim")
        shape = tuple(r.unpack(f"<{ndim}I")) if ndim else ()
    if len(shape) == 0:
        return _empty()
    r.unpack("<ii")  # context
    return r.array(r.i32(), shape)


def _densify(stype: int, shape, values: np.ndarray, aux: List[np.ndarray], r: _Reader) -> np.ndarray:
    dense = np.zeros(shape, dtype=values.dtype)
    if stype == 1:  # row_sparse: aux[0] = indices of the stored rows
        rows = aux[0].astype(np.int64)
        if values.shape[:1] != rows.shape or (rows.size and (rows.min() < 0 or rows.max() >= shape[0])):
            raise r.corrupt("inconsistent row_sparse array")
        dense[rows] = values.reshape((rows.size,) + tuple(shape[1:]))
    else:  # csr: aux[0] = indptr (rows + 1), aux[1] = column indices
        indptr, cols = aux[0].astype(np.int64), aux[1].astype(np.int64)
        if len(shape) != 2 or indptr.size != shape[0] + 1 or cols.size != values.size:
            raise r.corrupt("inconsistent csr array")
        row_of = np.repeat(np.arange(shape[0]), np.diff(indptr))
        dense[row_of, cols] = values
    return dense


def read_ndarray_list(buf, source: str = "<buffer>", shapes_only: bool = False
                      ) -> Tuple[List[np.ndarray], List[str]]:
    """Parse an NDArray list from a bytes-like buffer. Returns (arrays, names); names is empty
    for an unnamed list. The arrays own their memory (``shapes_only``: every header is read and
    checked as usual, the data is skipped and the arrays are zero-stride placeholders)."""
    r = _Reader(buf, source, shapes_only)
    head = bytes(buf[:8])
    if r.size == 0:
        raise MXNetParamsError(f"{source}: empty (0 bytes), not an MXNet .params file; {FIX}")
    if head != LIST_MAGIC.to_bytes(8, "little")[:len(head)]:
        kind, words = describe_file_start(bytes(buf[:64]))
        hint = {"zip": "a PyTorch .pth is a zip archive: give the file a .pth name",
                "torch-legacy": "give the file a .pth name"}.get(kind, FIX)
        raise MXNetParamsError(f"{source}: not an MXNet .params file (it starts with {words}); {hint}")
    r.unpack("<QQ")  # magic, reserved
    r.what = "the array count"
    n = r.u64()
    # Every record takes at least 4 bytes: a count the whole file cannot hold is a corrupt header,
    # one that only the rest of the file cannot hold means the file was cut.
    if n > r.size // 4:
        raise r.corrupt(f"an array count of {n}")
    if n > (r.size - r.pos) // 4:
        raise r.truncated(r.pos + 4 * n)
    stats: Counter = Counter()
    arrays = []
    for i in range(n):
        r.what = f"array {i} of {n}"  # 0-based, as in the file
        arrays.append(_read_record(r, stats))
    r.what = "the name count"
    k = r.u64()
    if k not in (0, n):
        raise r.corrupt(f"{k} names for {n} arrays")
    names = []
    for i in range(k):
        r.what = f"name {i} of {k}"
        length = r.u64()
        start = r.take(length, "a name")
        try:
            names.append(bytes(buf[start:start + length]).decode("utf-8"))
        except UnicodeDecodeError:
            raise r.corrupt("a name that is not valid text") from None
    if r.pos != r.size:
        logger.warning("%s: %d trailing bytes after the NDArray list ignored", source, r.size - r.pos)
    logger.debug("%s: %d arrays, record formats %s", source, n, dict(stats))
    return arrays, names


def strip_prefix(name: str) -> str:
    """'arg:conv1a_weight' → 'conv1a_weight' (checkpoint files mark parameters and auxiliary
    states; the names themselves are unique either way)."""
    return name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name


def read_shapes(path) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of a named ``.params`` file from a header pass (no data is read: the
    ImageNet ResNet-38 file is checked in milliseconds); the same errors as load_params."""
    return {k: tuple(v.shape) for k, v in load_params(path, _shapes_only=True).items()}


def load_params(path, *, keep_prefix: bool = False, _shapes_only: bool = False) -> Dict[str, np.ndarray]:
    """Read a named ``.params`` file into {name: array}, without the ``arg:``/``aux:`` prefixes
    unless keep_prefix. The file is memory-mapped, so the peak memory is about one file size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MXNet .params file")
    with open(path, "rb") as f:
        if path.stat().st_size == 0:  # mmap refuses empty files
            raise MXNetParamsError(f"{path}: empty (0 bytes), not an MXNet .params file; {FIX}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            arrays, names = read_ndarray_list(mm, str(path), shapes_only=_shapes_only)
    if not names:
        raise MXNetParamsError(f"{path}: the NDArray list has no names, so its arrays cannot be "
                               "matched to network parameters (expected a checkpoint saved with names)")
    out: Dict[str, np.ndarray] = {}
    for name, array in zip(names, arrays):
        key = name if keep_prefix else strip_prefix(name)
        if key in out:
            raise MXNetParamsError(f"{path}: the name {key!r} appears twice")
        out[key] = array
    return out


def get_args_parser():
    import argparse
    p = argparse.ArgumentParser("List the arrays of an MXNet .params file", add_help=False)
    p.add_argument("params", type=Path, help="an MXNet .params file, e.g. the ImageNet ResNet-38")
    return p


def main(args) -> None:
    """Print every array's name, dtype and shape (python -m network.mxnet_params FILE)."""
    if not args.params.is_file():
        raise MXNetParamsError(f"{args.params}: file not found")
    for key, value in load_params(args.params, keep_prefix=True).items():
        print(f"{key:50s} {str(value.dtype):8s} {tuple(value.shape)}")


if __name__ == "__main__":
    import sys

    from utils.cli import run_cli
    sys.exit(run_cli(get_args_parser, main, __doc__))
