"""Which weights made an output: identities of input files, recorded beside every output.

``train.py --resume --extend`` (or ``train_seg.py``'s) writes new weights under the old name, so a
path says nothing about what an output was made from. Every stage therefore records, beside its
outputs, the identity of each input (a *provenance record*: JSON with an ``"inputs"`` mapping
{path: identity}), and a stage whose recorded inputs differ from the current ones is never
counted as done:

==========================================  ==============================================
output                                      record (its ``"inputs"``)
==========================================  ==============================================
infer.py / infer_seg.py output folders      ``<folder>/.infer_settings.json``: the weights
evaluate.py results                         ``<save_path>.json``: the predictions' folder
train_seg.py run directory                  ``<run-dir>/inputs.json``: the pseudo-masks, --init
==========================================  ==============================================

Identities are cheap and robust:

* a file is {size, mtime_ns, sha256}: the sha256 (about 1 s per GB) is only recomputed when the
  size or the modification time differ from the recorded ones, and two files are the same when
  their sha256 are (a copy or a ``touch`` is not a change, a retrained checkpoint is);
* a folder is the sha256 of its own record without the modification times (so, transitively,
  the identity of the weights that made it and its settings), or None when it has no record
  (e.g. masks a user made elsewhere: their provenance is unknown and not checked).

:func:`stale_reason` follows the records upstream: evaluation results are stale when the
pseudo-masks changed since, or when the checkpoint that made those pseudo-masks did. The
pipeline scripts ask ``python utils/provenance.py check RECORD`` before they skip a stage
(script/_stages.sh). No torch import here: the check runs in a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional

RECORD_NAME = ".infer_settings.json"  # a prediction folder's record (infer.py, infer_seg.py)
RUN_RECORD_NAME = "inputs.json"       # a training run's record (train_seg.py), beside its weights
MAX_DEPTH = 8                         # records upstream followed by stale_reason


def file_identity(path, known: Optional[Mapping] = None) -> Dict:
    """{name, size, mtime_ns, sha256} of a file; the sha256 of ``known`` (a recorded identity)
    is reused when the size and modification time are unchanged."""
    st = Path(path).stat()
    ident = {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns \
            and known.get("sha256"):
        ident["sha256"] = known["sha256"]
    else:
        from utils.fetch import sha256_of  # here: the record check itself never hashes
        ident["sha256"] = sha256_of(path)
    return ident


def record_path(path) -> Path:
    """Where the provenance of ``path`` is recorded: a folder's own record, or for a file (a
    checkpoint) its run directory's."""
    path = Path(path)
    if path.is_dir():
        return path / RECORD_NAME
    if path.suffix == ".json":
        return path
    return path.parent / RUN_RECORD_NAME


def read_record(path) -> Optional[Dict]:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _stable(obj):
    """A record without modification times (they change on a copy, the content does not)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k != "mtime_ns"}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def record_digest(record: Mapping) -> str:
    return hashlib.sha256(json.dumps(_stable(record), sort_keys=True, default=str)
                          .encode()).hexdigest()


def folder_identity(folder) -> Dict:
    rec = read_record(Path(folder) / RECORD_NAME)
    return {"name": Path(folder).name, "record_sha256": None if rec is None else record_digest(rec)}


def identity(path, known: Optional[Mapping] = None) -> Dict:
    path = Path(path)
    return folder_identity(path) if path.is_dir() else file_identity(path, known)


def same(recorded: Mapping, now: Mapping) -> bool:
    if "record_sha256" in recorded or "record_sha256" in now:
        return recorded.get("record_sha256") == now.get("record_sha256")
    return recorded.get("size") == now.get("size") and recorded.get("sha256") == now.get("sha256")


def describe(ident: Optional[Mapping]) -> str:
    if not ident:
        return "none"
    if "record_sha256" in ident:
        d = ident.get("record_sha256")
        return f"record {d[:12]}" if d else "no record"
    return f"{ident.get('size')} bytes, sha256 {str(ident.get('sha256'))[:12]}"


def inputs_record(paths: Mapping[str, object]) -> Dict[str, Dict]:
    """{"path": identity} for the given input paths that exist (the ``inputs`` of a record)."""
    return {str(Path(p).resolve()): identity(p) for p in paths.values() if p is not None
            and Path(p).exists()}


def recorded_input(folder, path) -> Optional[Dict]:
    """The identity a folder's record holds for the input ``path``, or None."""
    rec = read_record(Path(folder) / RECORD_NAME) or {}
    return (rec.get("inputs") or {}).get(str(Path(path).resolve()))


def weights_changed(folder, weights, made_earlier: bool = False) -> Optional[str]:
    """Why the results in ``folder`` were made by other weights than ``weights`` is now (a
    clause for an error message), or None when they were made by these, or nothing is recorded.
    ``made_earlier``: an earlier stage of the same pipeline is about to write ``weights``."""
    old = recorded_input(folder, weights)
    if old is None:
        return None
    name = Path(weights).name
    if made_earlier:
        return (f"made by an earlier {name} ({describe(old)}), which an earlier stage of this "
                f"run trains anew")
    if not Path(weights).is_file():
        return None
    now = file_identity(weights, old)
    if same(old, now):
        return None
    return f"made by another {name} ({describe(old)} then, {describe(now)} now: retrained or replaced)"


def stale_reason(record: Optional[Mapping], depth: int = 0) -> Optional[str]:
    """Why the outputs a record describes are stale (one clause naming the changed input), or
    None: every recorded input still has its recorded identity, and so do their own inputs,
    upstream. A record without ``inputs`` (older runs) cannot tell and counts as current."""
    if not record or depth > MAX_DEPTH:
        return None
    for path, old in (record.get("inputs") or {}).items():
        p = Path(path)
        if not p.exists():
            if "record_sha256" in old:  # a folder of an earlier stage: it will be made anew
                return f"{p} (recorded: {describe(old)}) is gone"
            continue  # a deleted file (e.g. an init no longer needed) is not a changed one
        if p.is_dir() != ("record_sha256" in old):
            return f"{p} is now a {'folder' if p.is_dir() else 'file'}"
        now = identity(p, known=old)
        if not same(old, now):
            return f"{p} changed since ({describe(old)} then, {describe(now)} now)"
        upstream = stale_reason(read_record(record_path(p)), depth + 1)
        if upstream:
            return upstream
    return None


def check(path) -> Optional[str]:
    """stale_reason of a record file (None when it is absent: nothing to go by)."""
    return stale_reason(read_record(path))


def main(argv=None) -> int:
    """``python utils/provenance.py check RECORD``: prints why the outputs are stale and exits 1,
    or exits 0 when they are current (or unrecorded). For script/_stages.sh."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "check":
        print("usage: provenance.py check RECORD.json", file=sys.stderr)
        return 2
    reason = check(argv[1])
    if reason:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    # run as a file (script/_stages.sh): the repository root, for the lazy utils.fetch import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
