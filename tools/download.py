"""Download, verify and lay out the inputs of the pipelines (script/download.sh is its wrapper).

    bash script/download.sh voc12               # everything script/voc12_eps.sh needs
    bash script/download.sh coco                # everything script/coco_eps.sh needs
    bash script/download.sh weights released    # the two init weights; the 4 released checkpoints
    bash script/download.sh --dry-run all       # every file: source, size, checksum, destination

Items: voc12 (VOC 2012 trainval, SegmentationClassAug, the PFAN saliency maps of VOC), coco
(COCO 2014 images and annotations, the EPS COCO masks, the PFAN saliency maps of COCO, the COCO
image labels made by tools/make_cls_labels.py), weights (the ImageNet ResNet-38, also converted by
tools/convert_resnet38.py; the DeepLab-v2 COCO init, converted from DeepLab's init.caffemodel by
network/caffemodel.py), released (the four EPS checkpoints), all. voc12 and coco include the two
weight files. The sources, sizes, checksums and destinations are one table: data/downloads.py.

Everything lands where the scripts look by default (--root, default: the repository, so
datasets/VOCdevkit/VOC2012, datasets/coco, weights/). For each file:
  1. skip it when its data is present and passes its checks (counts per folder, checksums);
  2. check the free disk first, for everything still to fetch (the total is printed);
  3. fetch it into <root>/{datasets,weights}/.downloads/ (HTTP with Range resume after a dropped
     connection or Ctrl-C; Google Drive through gdown); a source that fails hands over to the
     next one, and the error names the manual step when none is left;
  4. verify the published checksum (md5/sha256), or the sha256 in the lock file when an earlier
     download recorded one; a mismatch keeps the file aside as <file>.corrupt, never extracted;
  5. extract into a staging folder with safe paths, checking the archive (zip CRC, complete tar);
  6. move the expected folders into place once their file counts are right, convert weights,
     and record the sha256 in <root>/{datasets,weights}/downloads.lock.json.
--mirror URL (or EPS_MIRROR) fetches every file as URL/<file name> over plain HTTP instead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import downloads as table  # noqa: E402
from data.downloads import Check, Row, Source  # noqa: E402
from utils import fetch  # noqa: E402
from utils.cli import add_flag, parent_parser, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fetch import ArchiveError, DownloadError, SourceError, human  # noqa: E402
from utils.io import atomic_write_text, file_system_errors, torch_save  # noqa: E402
from utils.progress import format_duration, is_terminal  # noqa: E402

logger = logging.getLogger("download")

LOCK_NAME = "downloads.lock.json"
DOWNLOADS_DIR = ".downloads"
TABLE_ENV = "EPS_DOWNLOAD_TABLE"   # tests only: a JSON table replacing data/downloads.py's
MIRROR_ENV = "EPS_MIRROR"
ROOT_ENV = "DOWNLOAD_ROOT"
BOOL = argparse.BooleanOptionalAction


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def get_args_parser():
    p = parent_parser("Download, verify and lay out the inputs")
    p.add_argument("items", nargs="*", type=str, metavar="ITEM",
                   help="what to fetch: voc12, coco, weights, released, all (several allowed)")
    add_flag(p, "--root", type=Path, default=None,
             help="where datasets/ and weights/ go (default: $DOWNLOAD_ROOT, else the repository, "
                  "where the scripts look)")
    add_flag(p, "--mirror", type=str, default=None,
             help="fetch every file as <URL>/<file name> over plain HTTP instead of its sources "
                  "(default: $EPS_MIRROR)")
    add_flag(p, "--dry-run", action=BOOL, default=False,
             help="list every file (source, size, checksum or integrity rule, destination, "
                  "status) and the disk needed; fetch nothing")
    add_flag(p, "--keep-archives", action=BOOL, default=False,
             help="keep the downloaded archives in <root>/{datasets,weights}/.downloads after "
                  "extraction (default: removed; the lock file keeps their sha256)")
    add_flag(p, "--coco-masks", type=str, default="eps", choices=["eps", "make"],
             help="COCO masks: eps = the EPS Google Drive masks the published numbers use "
                  "(default); make = tools/make_coco_masks.py from the annotations")
    add_flag(p, "--retries", type=int, default=3,
             help="attempts per source after a failure (a dropped connection resumes)")
    add_flag(p, "--retry-wait", type=float, default=2.0,
             help="seconds before the first retry (doubles each time)")
    add_flag(p, "--timeout", type=float, default=60.0,
             help="seconds without data before a connection counts as dropped")
    add_flag(p, "--workers", type=int, default=4,
             help="processes for tools/make_coco_masks.py (--coco-masks make)")
    add_flag(p, "--progress", action=BOOL, default=None,
             help="progress bars (default: on a terminal; log lines otherwise)")
    return p


# ------------------------------------------------------------------------------------------------
# context, paths, lock file
# ------------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    root: Path
    rows: Dict[str, Row]
    items: Dict[str, Tuple[str, ...]]
    mirror: Optional[str] = None
    keep_archives: bool = False
    retries: int = 3
    retry_wait: float = 2.0
    timeout: float = 60.0
    progress: Optional[bool] = None
    workers: int = 4
    _ids: Dict[str, List[str]] = field(default_factory=dict)

    def path(self, rel: str, base: Optional[Path] = None) -> Path:
        """A table path: ``repo:x`` is in the repository, anything else under ``base`` (--root)."""
        if rel.startswith("repo:"):
            return REPO / rel[len("repo:"):]
        return (self.root if base is None else base) / rel

    def ids(self, spec) -> List[str]:
        """Ids of a metadata list ("voc12/train_aug" -> metadata/voc12/train_aug.txt) or a tuple."""
        if not isinstance(spec, str):
            return list(spec)
        if spec not in self._ids:
            from data.metadata import read_id_list
            self._ids[spec] = read_id_list(REPO / "metadata" / f"{spec}.txt")
        return self._ids[spec]


def top(row: Row) -> Optional[str]:
    """datasets or weights: the folder under --root that holds the row's data and lock file."""
    dests = [p.dest for p in row.place] + [c.path for c in row.checks if not c.path.startswith("repo:")]
    return dests[0].split("/")[0] if dests else None


def downloads_dir(ctx: Ctx, row: Row) -> Path:
    return ctx.root / (top(row) or "datasets") / DOWNLOADS_DIR


def lock_path(ctx: Ctx, row: Row) -> Optional[Path]:
    t = top(row)
    return ctx.root / t / LOCK_NAME if t else None


def read_lock(path: Optional[Path]) -> dict:
    if path is None or not path.is_file():
        return {"format": 1, "rows": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(data.get("rows"), dict)
        return data
    except (ValueError, AssertionError, AttributeError):
        raise DownloadError(f"{path}: not a lock file written by tools/download.py (unreadable "
                            f"JSON); move it away and rerun") from None


def lock_entry(ctx: Ctx, row: Row) -> dict:
    entry = read_lock(lock_path(ctx, row))["rows"].get(row.key, {})
    return entry if entry.get("file") == row.file else {}


def write_lock_entry(ctx: Ctx, row: Row, entry: dict) -> None:
    path = lock_path(ctx, row)
    if path is None:
        return
    data = read_lock(path)
    data["rows"][row.key] = entry
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def sources(ctx: Ctx, row: Row) -> Tuple[Source, ...]:
    if ctx.mirror:
        return (Source("http", f"{ctx.mirror.rstrip('/')}/{quote(row.file)}",
                       f"mirror (--mirror / {MIRROR_ENV})"),)
    return row.sources


# ------------------------------------------------------------------------------------------------
# progress: a tqdm bar on a terminal, a log line every 10 s elsewhere (utils/progress.py's rule)
# ------------------------------------------------------------------------------------------------
class ByteProgress:
    def __init__(self, desc: str, total: Optional[int], enabled: Optional[bool]):
        self.desc, self.total, self.n = desc, total, 0
        self.t0 = self.t_last = time.perf_counter()
        self.bar = None
        if enabled is None:
            enabled = is_terminal()
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            dynamic_ncols=True, mininterval=0.5)

    def to(self, n: int, total: Optional[int] = None) -> None:
        if total is not None and self.total is None:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        if self.bar is not None:
            self.bar.update(n - self.n)
        self.n = n
        now = time.perf_counter()
        if self.bar is None and now - self.t_last >= 10.0:
            self.t_last = now
            rate = self.n / max(now - self.t0, 1e-9)
            left = (f", ETA {format_duration((self.total - self.n) / rate)}"
                    if self.total and rate > 0 else "")
            of = f" of {human(self.total)}" if self.total else ""
            logger.info("%s: %s%s, %s/s%s", self.desc, human(self.n), of, human(rate), left)

    def add(self, n: int) -> None:
        self.to(self.n + n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def byte_progress(desc: str, total: Optional[int], enabled: Optional[bool]):
    bar = ByteProgress(desc, total, enabled)
    try:
        yield bar
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------
# checks of the laid-out data
# ------------------------------------------------------------------------------------------------
def _folder_failure(ctx: Ctx, check: Check, p: Path) -> Optional[str]:
    if not p.is_dir():
        return f"{p}: folder not found"
    names = set(os.listdir(p))
    files = {n for n in names if n.endswith(check.suffix)} if check.suffix else names
    if check.count is not None and len(files) != check.count:
        cite = f" ({check.cite})" if check.cite else ""
        return f"{p}: {len(files):,} *{check.suffix} files, expected {check.count:,}{cite}"
    if check.ids is not None:
        ids = ctx.ids(check.ids)
        missing = [i for i in ids if f"{i}{check.suffix}" not in names]
        if missing:
            what = check.ids if isinstance(check.ids, str) else "listed"
            return (f"{p}: {len(missing):,} of the {len(ids):,} {what} ids have no "
                    f"<id>{check.suffix} (first: {', '.join(missing[:3])})")
    return None


def _digest_failure(ctx: Ctx, row: Row, p: Path) -> Optional[str]:
    """A downloaded file against the published checksums and the lock file's sha256."""
    expected = dict(row.checksums)
    entry = lock_entry(ctx, row)
    if "sha256" not in expected and entry.get("sha256"):
        expected["sha256"] = entry["sha256"]
    if not expected:
        return None
    with byte_progress(f"verify {p.name}", p.stat().st_size, ctx.progress) as bar:
        got = fetch.file_digests(p, expected, progress=bar.add)
    for algo, want in expected.items():
        if got[algo] != want.lower():
            source = (row.checksum_cite if algo in dict(row.checksums)
                      else f"recorded in {lock_path(ctx, row)} on {entry.get('date', '?')}")
            return f"{p}: {algo} expected {want} ({source}), actual {got[algo]}"
    return None


LOAD_KINDS = ("checksum", "network", "deeplab_init", "imagenet_trunk", "labels")


def _load_failure(ctx: Ctx, check: Check, row: Row, p: Path) -> Optional[str]:
    kind, _, arg = check.load.partition(":")
    try:
        if kind == "checksum":
            return _digest_failure(ctx, row, p)
        if kind == "network":
            from network.weights import identify_checkpoint, load_state_dict_file
            name, classes = arg.split(":")
            found = identify_checkpoint(load_state_dict_file(p), int(classes))
            if found.network != name:
                return f"{p}: a {found.network} checkpoint, expected {name} ({row.what})"
        elif kind == "deeplab_init":
            from network.caffemodel import reference_init_shapes
            from network.weights import load_state_dict_file
            sd = load_state_dict_file(p)
            n_fc = sd["fc.weight"].shape[0] if "fc.weight" in sd else 91
            ref = reference_init_shapes(arg, n_fc)
            bad = [k for k in ref if k not in sd or tuple(sd[k].shape) != ref[k]] + \
                  [k for k in sd if k not in ref]
            if bad:
                return f"{p}: not the DeepLab init of {arg} ({len(bad)} keys differ, e.g. {bad[0]})"
        elif kind == "imagenet_trunk":
            import torch
            from network.resnet38d import ResNet38d
            from network.weights import load_state_dict_file
            sd = load_state_dict_file(p)
            with torch.device("meta"):
                ref = {k: tuple(v.shape) for k, v in ResNet38d().state_dict().items()}
            if {k: tuple(v.shape) for k, v in sd.items()} != ref:
                return f"{p}: not a converted ResNet-38 trunk (tools/convert_resnet38.py)"
        elif kind == "labels":
            specs = [check.ids] if check.ids is not None else arg.split(":")[1].split(",")
            have = {line.split()[0] for line in p.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.startswith("#")}
            for spec in specs:
                missing = [i for i in ctx.ids(spec) if i not in have]
                if missing:
                    what = spec if isinstance(spec, str) else "listed"
                    return f"{p}: no labels for {len(missing):,} {what} ids (first: {missing[0]})"
        else:  # a misspelt kind must not pass every file unchecked
            raise ValueError(f"{row.key}: unknown check kind {check.load!r} (data/downloads.py "
                             f"Check.load: one of {', '.join(LOAD_KINDS)})")
    except UserError as e:
        return " ".join(str(e).split())
    return None


def check_failure(ctx: Ctx, row: Row, check: Check, base: Optional[Path] = None) -> Optional[str]:
    p = ctx.path(check.path, base)
    if check.is_folder:
        return _folder_failure(ctx, check, p)
    if not p.is_file():
        return f"{p}: file not found"
    return _load_failure(ctx, check, row, p) if check.load else None


def row_failures(ctx: Ctx, row: Row, base: Optional[Path] = None,
                 include_repo: bool = True) -> List[str]:
    out = []
    for c in row.checks:
        if not include_repo and c.path.startswith("repo:"):
            continue
        f = check_failure(ctx, row, c, base)
        if f:
            out.append(f)
    return out


def describe_check(c: Check) -> str:
    where = c.path
    if c.is_folder:
        parts = []
        if c.count is not None:
            parts.append(f"{c.count:,} *{c.suffix}")
        if c.ids is not None:
            parts.append(f"<id>{c.suffix} for every {c.ids if isinstance(c.ids, str) else 'listed'} id")
        return f"{where}: {', '.join(parts)}"
    kind, _, arg = c.load.partition(":")
    return f"{where}: " + {"": "present", "checksum": "present, checksum as downloaded",
                           "network": f"loads as {arg.replace(':', ' with ')} classes",
                           "deeplab_init": f"DeepLab init keys of {arg}, key for key",
                           "imagenet_trunk": "ResNet-38 trunk keys, key for key",
                           "labels": f"labels for every {arg.partition(':')[2] or 'listed'} id"}.get(kind, c.load)


# ------------------------------------------------------------------------------------------------
# fetching one file
# ------------------------------------------------------------------------------------------------
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")


def ordinal(i: int) -> str:
    """A source's rank by its 0-based position: "first", "second", "third", ..., "10th"."""
    return ORDINALS[i] if i < len(ORDINALS) else f"{i + 1}th"


def fetch_file(ctx: Ctx, row: Row) -> Tuple[Path, str]:
    """The row's file in its .downloads folder, complete; returns (path, source used). A file
    already there (an earlier run, or put there by hand) is used as it is."""
    target = downloads_dir(ctx, row) / row.file
    if target.is_file():
        logger.info("%s: using %s (already downloaded)", row.key, target)
        return target, "already in " + str(target.parent)
    tried = []
    for i, src in enumerate(sources(ctx, row)):
        label = "source" if i == 0 else f"{ordinal(i)} source"
        logger.info("%s: fetching %s from %s", row.key, row.file, src.url)
        try:
            with byte_progress(row.file, row.size, ctx.progress) as bar:
                if src.kind == "gdrive":
                    fetch.gdrive_download(src.where, target, timeout=ctx.timeout,
                                          retries=ctx.retries, progress=bar.to)
                else:
                    part = target.with_name(target.name + ".part")
                    fetch.http_download(src.url, part, size=row.size, timeout=ctx.timeout,
                                        retries=ctx.retries, retry_wait=ctx.retry_wait,
                                        progress=bar.to)
                    os.replace(part, target)
            return target, src.url
        except SourceError as e:
            tried.append(f"{src.url}: {e}")
            rest = sources(ctx, row)[i + 1:]
            if rest:
                logger.warning("%s: %s %s failed (%s); trying the %s source %s", row.key,
                               label, src.url, e, ordinal(i + 1), rest[0].url)
    raise DownloadError(f"{row.key}: {row.file} could not be fetched ({'; '.join(tried)}); "
                        f"{'no second source is known' if len(tried) < 2 else 'every source failed'}"
                        f": {row.manual}")


def verify_download(ctx: Ctx, row: Row, path: Path) -> Dict[str, str]:
    """Size and checksums of a downloaded file; a bad file is moved aside, never extracted."""
    def refuse(msg: str):
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise DownloadError(f"{msg}; kept aside as {aside}, nothing was extracted; rerun to "
                            f"download it again (or see README 'Downloads')")

    size = path.stat().st_size
    if row.size is not None and size != row.size:
        refuse(f"{path}: size expected {row.size:,} bytes ({row.size_cite}), actual {size:,}")
    expected = dict(row.checksums)
    entry = lock_entry(ctx, row)
    algos = list(dict.fromkeys(["sha256", *expected]))
    with byte_progress(f"verify {row.file}", size, ctx.progress) as bar:
        got = fetch.file_digests(path, algos, progress=bar.add)
    for algo, want in expected.items():
        if got[algo] != want.lower():
            refuse(f"{path}: checksum mismatch: {algo} expected {want} ({row.checksum_cite}), "
                   f"actual {got[algo]}")
    if entry.get("sha256") and got["sha256"] != entry["sha256"]:
        refuse(f"{path}: checksum mismatch: sha256 expected {entry['sha256']} (recorded in "
               f"{lock_path(ctx, row)} on {entry.get('date', '?')}), actual {got['sha256']}")
    how = (", ".join(f"{a} as published" for a in expected) if expected else
           "sha256 as recorded in the lock file" if entry.get("sha256") else
           "no checksum published: sha256 recorded")
    logger.info("%s: %s verified (%s, %s)", row.key, path.name, human(size), how)
    return {**got, "size": size, "verified": how}


# ------------------------------------------------------------------------------------------------
# extraction and placing
# ------------------------------------------------------------------------------------------------
def _find_folder(extract: Path, spec: str, ctx: Ctx) -> Path:
    """``@<list><suffix>``: the folder of the archive that holds the list's first id."""
    body = spec[1:]
    stem, dot, suffix = body.rpartition(".")
    name = f"{ctx.ids(stem)[0]}{dot}{suffix}"
    for dirpath, dirnames, filenames in os.walk(extract):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        if name in filenames:
            return Path(dirpath)
    raise ArchiveError(f"no folder of the archive holds {name} (the first id of {stem}); it is "
                       f"not the expected archive")


def unpack(ctx: Ctx, row: Row, archive: Path, staging: Path) -> Path:
    """Extract ``archive`` and place its folders under ``staging/placed`` (mirroring --root)."""
    extract, placed = staging / "x", staging / "placed"
    kind = fetch.sniff_archive(archive) if row.archive == "auto" else row.archive
    logger.info("%s: extracting %s (%s)", row.key, archive.name, kind)
    with byte_progress(f"extract {archive.name}", None, ctx.progress) as bar:
        extractor = fetch.extract_zip if kind == "zip" else fetch.extract_tar
        n = extractor(archive, extract, row.members, progress=bar.add)
    logger.info("%s: %d files extracted", row.key, n)
    for place in row.place:
        src = _find_folder(extract, place.src, ctx) if place.src.startswith("@") else extract / place.src
        if not src.exists():
            raise ArchiveError(f"{archive}: no {place.src} in the archive; it is not the expected "
                               f"archive")
        dest = ctx.path(place.dest, placed)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    return placed


_POST_OUTPUT_ARG = {"convert_resnet38": 0, "caffemodel_to_pth": 0, "coco_labels": 1}


def post_output(step: Tuple[str, ...]) -> Optional[str]:
    """The file a post step writes (a table path), or None."""
    i = _POST_OUTPUT_ARG.get(step[0])
    return step[1 + i] if i is not None else None


def _kept_at_root(ctx: Ctx, row: Row, dest_rel: str) -> bool:
    """A destination already at --root is kept when it passes the row's checks on it (or when no
    check covers it: e.g. VOC's SegmentationObject/ of an earlier extraction)."""
    p = ctx.path(dest_rel)
    if p.is_dir() and not any(p.iterdir()):
        p.rmdir()  # an empty folder is no data
        return False
    if not p.exists():
        return False
    mine = [c for c in row.checks if c.path == dest_rel or c.path.startswith(dest_rel + "/")]
    return not any(check_failure(ctx, row, c) for c in mine)


def conflicts(ctx: Ctx, row: Row) -> List[str]:
    """Destinations of an archive that exist but fail their checks: refused before anything is
    fetched, since extracting over them would mix two versions."""
    if row.archive not in ("tar", "zip", "auto"):
        return []
    out = []
    for rel in [p.dest for p in row.place] + [o for o in map(post_output, row.post) if o]:
        p = ctx.path(rel)
        if p.exists() and not _kept_at_root(ctx, row, rel):
            failing = [f for c in row.checks if c.path == rel and (f := check_failure(ctx, row, c))]
            out.append(f"{p} exists but is not complete ({failing[0] if failing else 'unknown'}); "
                       f"move it away and rerun")
    return out


def move_into_place(ctx: Ctx, row: Row, placed: Path, produced: Sequence[str]) -> None:
    for rel in produced:
        src, dest = ctx.path(rel, placed), ctx.path(rel)
        if not src.exists():
            continue
        if dest.exists():
            if _kept_at_root(ctx, row, rel):
                logger.info("%s: %s is already complete; kept", row.key, dest)
                continue
            raise DownloadError(f"{dest} exists but is not complete; move it away and rerun")
        dest.parent.mkdir(parents=True, exist_ok=True)
        move_across_disks(src, dest)


def move_across_disks(src: Path, dest: Path) -> None:
    """``os.replace``; when ``dest`` is on another disk than the staging folder (a symlinked
    datasets/VOCdevkit, say), a copy beside ``dest`` renamed into place, then ``src`` removed:
    ``dest`` appears whole or not at all either way."""
    try:
        os.replace(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    logger.info("copying %s to %s (another disk)", src, dest)
    tmp = dest.with_name(f".{dest.name}.copying")
    remove = shutil.rmtree if tmp.is_dir() and not tmp.is_symlink() else Path.unlink
    if tmp.exists() or tmp.is_symlink():
        remove(tmp)  # what an interrupted copy left
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise fetch.DiskFullError(f"disk full while copying {src.name} to {dest.parent}; "
                                      f"free some space there and rerun") from None
        raise
    os.replace(tmp, dest)
    shutil.rmtree(src) if src.is_dir() else src.unlink()


# ------------------------------------------------------------------------------------------------
# steps after placing (conversions, files made here)
# ------------------------------------------------------------------------------------------------
def post_convert_resnet38(ctx: Ctx, row: Row, base: Path, out_rel: str) -> List[str]:
    from tools.convert_resnet38 import convert
    src, out = ctx.path(row.place[0].dest, base), ctx.path(out_rel, base)
    if out.is_file() and not check_failure(ctx, row, Check(out_rel, load="imagenet_trunk"), base):
        return [out_rel]
    logger.info("%s: converting %s -> %s (tools/convert_resnet38.py)", row.key, src.name, out.name)
    torch_save(convert(src), out)
    logger.info("%s: wrote %s (sha256 %s)", row.key, out, fetch.sha256_of(out))
    return [out_rel]


def post_caffemodel_to_pth(ctx: Ctx, row: Row, base: Path, out_rel: str, arch: str,
                           n_fc: str) -> List[str]:
    from network.caffemodel import convert_init
    src, out = ctx.path(row.place[0].dest, base), ctx.path(out_rel, base)
    logger.info("%s: converting %s -> %s without Caffe (network/caffemodel.py, %s)", row.key,
                src.name, out.name, arch)
    torch_save(convert_init(src, arch, int(n_fc)), out)
    if not ctx.keep_archives:
        src.unlink()
    return [out_rel]


def post_coco_labels(ctx: Ctx, row: Row, base: Path, coco_rel: str, out_rel: str) -> List[str]:
    from tools import make_cls_labels
    out = ctx.path(out_rel, base)
    if out.exists():
        raise DownloadError(f"{out} exists but lacks ids of the lists (see above); remove it and "
                            f"rerun to make it again from the annotations")
    argv = ["--dataset", "coco", "--data-root", str(ctx.path(coco_rel)), "--out", str(out)]
    logger.info("%s: python tools/make_cls_labels.py %s", row.key, " ".join(argv))
    make_cls_labels.main(make_cls_labels.get_args_parser().parse_args(argv))
    return [out_rel]


def post_coco_masks(ctx: Ctx, row: Row, base: Path, coco_rel: str) -> List[str]:
    from tools import make_coco_masks
    argv = ["--data-root", str(ctx.path(coco_rel)), "--workers", str(ctx.workers)]
    logger.info("%s: python tools/make_coco_masks.py %s", row.key, " ".join(argv))
    make_coco_masks.main(make_coco_masks.get_args_parser().parse_args(argv))
    return []


POST_STEPS: Dict[str, Callable[..., List[str]]] = {
    "convert_resnet38": post_convert_resnet38,
    "caffemodel_to_pth": post_caffemodel_to_pth,
    "coco_labels": post_coco_labels,
    "coco_masks": post_coco_masks,
}


def run_post(ctx: Ctx, row: Row, base: Path) -> List[str]:
    produced: List[str] = []
    for name, *args in row.post:
        produced += POST_STEPS[name](ctx, row, base, *args)
    return produced


# ------------------------------------------------------------------------------------------------
# one row
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    key: str
    status: str          # present | done | failed
    fetched: int = 0     # bytes downloaded
    note: str = ""


def process_row(ctx: Ctx, row: Row) -> Result:
    failing = row_failures(ctx, row)
    if not failing:
        return Result(row.key, "present", note="present and verified")
    logger.info("%s: to do (%s)", row.key, failing[0])
    if row.archive == "none":  # made here (COCO labels, COCO masks from the annotations)
        run_post(ctx, row, ctx.root)
        failing = row_failures(ctx, row)
        if failing:
            raise DownloadError(f"{row.key}: made, but {failing[0]}")
        return Result(row.key, "done", note="made")
    if row.archive == "file":
        return _process_file(ctx, row)
    bad = conflicts(ctx, row)
    if bad:
        raise DownloadError(f"{row.key}: {bad[0]}")
    path, source = fetch_file(ctx, row)
    info = verify_download(ctx, row, path)
    staging = downloads_dir(ctx, row) / f"staging-{row.key}"
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left
    try:
        try:
            placed = unpack(ctx, row, path, staging)
        except ArchiveError as e:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            raise DownloadError(f"{row.key}: {e}; kept aside as {aside}; nothing was moved into "
                                f"place") from None
        try:
            produced = [p.dest for p in row.place] + run_post(ctx, row, placed)
        except UserError as e:
            raise DownloadError(f"{row.key}: {' '.join(str(e).split())}; {path} is kept (delete it "
                                f"to download it again); nothing was moved into place") from None
        failing = row_failures(ctx, row, placed, include_repo=False)
        if failing:
            raise DownloadError(f"{row.key}: the extracted data fails its checks: {failing[0]}; "
                                f"{path} is kept (delete it to download it again); nothing was "
                                f"moved into place")
        move_into_place(ctx, row, placed, produced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    failing = row_failures(ctx, row)
    if failing:
        raise DownloadError(f"{row.key}: {failing[0]}")
    _record(ctx, row, path, source, info, produced)
    return Result(row.key, "done", fetched=info["size"], note=info["verified"])


def _process_file(ctx: Ctx, row: Row) -> Result:
    """A single file (weights, checkpoints): verified, then renamed into place atomically."""
    dest = ctx.path(row.place[0].dest)
    fetched, info, source = 0, None, "in place"
    if dest.is_file():
        f = _digest_failure(ctx, row, dest)
        if f:
            raise DownloadError(f"{row.key}: {f}; move it away and rerun")
    else:
        path, source = fetch_file(ctx, row)
        info = verify_download(ctx, row, path)
        fetched = info["size"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    produced = run_post(ctx, row, ctx.root)
    failing = row_failures(ctx, row)
    if failing:
        raise DownloadError(f"{row.key}: {failing[0]}")
    if info is None:
        d = fetch.file_digests(dest, ["sha256"])
        info = {"sha256": d["sha256"], "size": dest.stat().st_size,
                "verified": "present; sha256 recorded"}
    _record(ctx, row, dest, source, info, produced)
    return Result(row.key, "done", fetched=fetched, note=info["verified"])


def _record(ctx: Ctx, row: Row, path: Path, source: str, info: dict, produced: Sequence[str]) -> None:
    outputs = {}
    for rel in produced:
        p = ctx.path(rel)
        if p.is_file():
            outputs[rel] = fetch.sha256_of(p)
    entry = {"file": row.file, "size": info["size"], "sha256": info["sha256"],
             "verified": info["verified"], "source": source,
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "outputs": outputs}
    entry.update({a: info[a] for a in dict(row.checksums) if a in info})
    write_lock_entry(ctx, row, entry)
    if not ctx.keep_archives and row.archive != "file" and path.is_file():
        path.unlink()


# ------------------------------------------------------------------------------------------------
# plan, disk, dry run
# ------------------------------------------------------------------------------------------------
def _have_bytes(ctx: Ctx, row: Row) -> int:
    if not row.file:
        return 0
    d = downloads_dir(ctx, row)
    for p in (d / row.file, d / (row.file + ".part")):
        if p.is_file():
            return p.stat().st_size
    return 0


def _existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _filesystem(p: Path) -> Tuple[int, Path]:
    """The file system ``p`` is (or will be) written on: the device of its nearest existing
    folder with symlinks followed (a datasets/VOCdevkit linked to another disk counts there),
    and that folder's real path, which names the disk in messages."""
    where = _existing(p)
    return where.stat().st_dev, where.resolve()


def _destinations(ctx: Ctx, row: Row) -> List[Path]:
    """Where a row's data lands: its placed folders and converted files (rows made here: the
    folders their checks look at)."""
    rels = [p.dest for p in row.place] + [o for o in map(post_output, row.post) if o]
    return [ctx.path(r) for r in rels or [c.path for c in row.checks]]


def disk_plan(ctx: Ctx, todo: Sequence[Row]) -> Tuple[int, int, Dict[Path, int]]:
    """(bytes to download (published sizes), bytes estimated (sizes not published), bytes needed
    per file system). Each destination's real file system (symlinks followed) is charged what
    stays there: the extracted or converted data, a downloaded file that is the data itself;
    the downloads folder's file system the archives (all of them with --keep-archives) plus,
    for the largest row, what it holds only while that row runs: its archive (removed once the
    row is done) and, when a destination is on another disk, the extracted tree in the staging
    folder that is copied there. A row whose destinations span several file systems charges
    each the whole of it (how it splits is not published)."""
    known = sum(max(0, r.size - _have_bytes(ctx, r)) for r in todo if r.file and r.size)
    estimated = sum(r.estimate for r in todo if r.file and r.size is None)
    stays: Dict[int, int] = {}
    passing: Dict[int, List[int]] = {}
    anchors: Dict[int, Path] = {}

    def seen(path: Path) -> int:
        dev, anchor = _filesystem(path)
        anchors.setdefault(dev, anchor)
        return dev

    for r in todo:
        fetched = 0
        if r.file:
            fetched = max(0, (r.size if r.size is not None else r.estimate) - _have_bytes(ctx, r))
        staging = seen(downloads_dir(ctx, r))
        dests = {seen(p) for p in _destinations(ctx, r)} or {staging}
        for dev in dests:
            stays[dev] = stays.get(dev, 0) + r.unpacked + (fetched if r.archive == "file" else 0)
        transient = 0
        if r.archive != "file" and ctx.keep_archives:
            stays[staging] = stays.get(staging, 0) + fetched
        elif r.archive != "file":
            transient += fetched
        if dests - {staging}:  # staged (downloaded, extracted) here, then copied across
            transient += r.unpacked if r.archive != "file" else fetched
        passing.setdefault(staging, []).append(transient)
    need = {anchor: stays.get(dev, 0) + max(passing.get(dev, []), default=0)
            for dev, anchor in anchors.items()}
    return known, estimated, {a: n for a, n in need.items() if n}


def check_disk(ctx: Ctx, todo: Sequence[Row]) -> str:
    known, estimated, need = disk_plan(ctx, todo)
    lines = []
    for anchor, n in need.items():
        free = fetch.disk_usage(anchor).free
        if n > free:
            raise DownloadError(f"not enough free disk: {human(n)} needed on the disk of {anchor} "
                                f"({human(known)} to download"
                                f"{f' + about {human(estimated)} of unpublished size' if estimated else ''}"
                                f", then extracted), {human(free)} free; free some space or pass "
                                f"--root on a larger disk")
        lines.append(f"{human(n)} needed on the disk of {anchor} ({human(free)} free)")
    est = f" + about {human(estimated)} whose size is not published (estimated)" if estimated else ""
    return "; ".join([f"to download: {human(known)}{est}"] + lines)


def _checksum_text(ctx: Ctx, row: Row) -> str:
    if row.checksums:
        return "; ".join(f"{a} {h}" for a, h in row.checksums) + f" [{row.checksum_cite}]"
    entry = lock_entry(ctx, row)
    if entry.get("sha256"):
        return f"sha256 {entry['sha256']} [recorded in {lock_path(ctx, row)} on {entry.get('date')}]"
    if row.file is None:
        return "none (made here)"
    return f"none published: sha256 recorded at first download in {lock_path(ctx, row)}"


def dry_run(ctx: Ctx, keys: Sequence[str]) -> List[Row]:
    todo = []
    for key in keys:
        row = ctx.rows[key]
        items = [i for i, keys in ctx.items.items() if key in keys]
        failing = row_failures(ctx, row)
        verb = "to make" if row.file is None else "to fetch"
        status = "present and verified" if not failing else f"{verb} ({failing[0]})"
        if failing:
            todo.append(row)
        print(f"[{', '.join(items)}] {row.key}: {row.what}")
        if row.used_by:
            print(f"    used by    {', '.join('script/' + u for u in row.used_by)}")
        if row.file:
            print(f"    file       {row.file} ({row.archive})")
        for i, s in enumerate(sources(ctx, row)):
            print(f"    {'source' if i == 0 else ordinal(i):10s} {s.url} [{s.cite}]")
        if row.file and not sources(ctx, row):
            print("    source     none")
        if row.file:
            size = (f"{row.size:,} bytes ({human(row.size)}) [{row.size_cite}]" if row.size
                    else f"{row.size_cite}; about {human(row.estimate)} (estimate, for the disk check)")
            print(f"    size       {size}")
        print(f"    checksum   {_checksum_text(ctx, row)}")
        integrity = {"tar": "complete tar (every member, end-of-archive blocks), safe paths",
                     "zip": "zip CRC of every member, safe paths",
                     "auto": "zip CRC or complete tar (type from its first bytes), safe paths",
                     "file": "the file itself", "none": "made by " + ", ".join(
                         a[0] for a in row.post)}[row.archive]
        print(f"    integrity  {integrity}")
        for c in row.checks:
            print(f"    check      {describe_check(c)}")
        for p in row.place:
            print(f"    dest       {ctx.path(p.dest)}")
        for step in row.post:
            out = post_output(step)
            print(f"    then       {step[0]}" + (f" -> {ctx.path(out)}" if out else ""))
        if not row.file and row.manual:
            print(f"    command    {row.manual}")
        print(f"    status     {status}")
    return todo


# ------------------------------------------------------------------------------------------------
def load_table() -> Tuple[Dict[str, Row], Dict[str, Tuple[str, ...]]]:
    path = os.environ.get(TABLE_ENV)
    if not path:
        return table.ROWS, table.ITEMS
    logger.warning("using the download table %s from $%s instead of data/downloads.py (meant for "
                   "tests)", path, TABLE_ENV)
    try:
        return table.table_from_json(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"${TABLE_ENV}={path}: not a download table ({e})") from None


def make_ctx(args) -> Ctx:
    rows, items = load_table()
    root = args.root or Path(os.environ.get(ROOT_ENV) or REPO)
    mirror = args.mirror if args.mirror is not None else os.environ.get(MIRROR_ENV) or None
    if mirror and not mirror.startswith(("http://", "https://")):
        raise DownloadError(f"--mirror {mirror}: expected an http:// or https:// URL")
    if args.retries < 0 or args.timeout <= 0 or args.retry_wait < 0:
        raise DownloadError("--retries and --retry-wait must be >= 0 and --timeout > 0")
    if args.coco_masks == "make" and "coco_masks" in rows:
        r = rows["coco_masks"]
        rows = {**rows, "coco_masks": dataclasses.replace(
            r, file=None, sources=(), archive="none", place=(), post=(("coco_masks", table.COCO),),
            what=r.what + ", made by tools/make_coco_masks.py from the annotations")}
    return Ctx(root=Path(root).resolve(), rows=rows, items=items, mirror=mirror,
               keep_archives=args.keep_archives, retries=args.retries, retry_wait=args.retry_wait,
               timeout=args.timeout, progress=args.progress, workers=args.workers)


def main(args) -> List[Result]:
    # Everything here is file work on the user's folders: an OSError on a path (permission
    # denied on an existing sub-folder, a file where a folder belongs) is one line naming it,
    # for the whole run before the rows, and per row below (the other rows go on)
    with file_system_errors():
        return _main(args)


def _main(args) -> List[Result]:
    ctx = make_ctx(args)
    names = list(ctx.items) + ["all"]
    if not args.items:
        raise DownloadError(f"name what to download: {', '.join(names)} (e.g. bash "
                            f"script/download.sh voc12; --dry-run all lists every file)")
    unknown = [i for i in args.items if i not in names]
    if unknown:
        raise DownloadError(f"unknown item {unknown[0]!r}; choose from {', '.join(names)}")
    keys = table.item_rows(args.items, ctx.items)
    if args.dry_run:
        todo = dry_run(ctx, keys)
        known, estimated, need = disk_plan(ctx, todo)
        print(f"{len(todo)} of {len(keys)} rows to fetch or make: {human(known)} to download"
              + (f" + about {human(estimated)} of unpublished size" if estimated else "")
              + "".join(f"; {human(n)} needed on the disk of {a} ({human(fetch.disk_usage(a).free)} free)"
                        for a, n in need.items()))
        return []
    rows = [ctx.rows[k] for k in keys]
    todo = [r for r in rows if row_failures(ctx, r)]
    if todo:
        from utils.run import check_writable
        check_writable(ctx.root, "--root")  # one line now, not a traceback at the first write
    for r in todo:
        bad = conflicts(ctx, r)
        if bad:
            raise DownloadError(f"{r.key}: {bad[0]}")
    drive = [r.key for r in todo if r.file and any(s.kind == "gdrive" for s in sources(ctx, r))]
    if drive:  # say so now, not after the other gigabytes
        try:
            import gdown  # noqa: F401
        except ImportError:
            raise DownloadError(f"{', '.join(drive)} come from Google Drive, which needs gdown: pip "
                                f"install -r requirements-download.txt (or use --mirror)") from None
    if todo:
        print(f"{len(todo)} of {len(rows)} rows to fetch or make under {ctx.root}: "
              f"{check_disk(ctx, todo)}", flush=True)
    results: Dict[str, Result] = {}
    for r in rows:
        try:
            with file_system_errors():
                results[r.key] = process_row(ctx, r)
        except KeyboardInterrupt:
            print(f"interrupted during {r.key}: rerun the same command to resume (a partial "
                  f"download continues where it stopped)", file=sys.stderr, flush=True)
            raise
        except UserError as e:  # this row failed (download, check, conversion, file system): go on
            msg = " ".join(str(e).split())
            msg = msg if msg.startswith(f"{r.key}:") else f"{r.key}: {msg}"
            logger.error("%s", msg)
            results[r.key] = Result(r.key, "failed", note=msg)
        res = results[r.key]
        print(f"  {r.key}: {res.status}" + (f", {human(res.fetched)} downloaded" if res.fetched else "")
              + (f" ({res.note})" if res.note and res.status != "failed" else ""), flush=True)
    for item in args.items:
        its = [results[k] for k in table.item_rows([item], ctx.items)]
        failed = [x for x in its if x.status == "failed"]
        fetched = sum(x.fetched for x in its)
        print(f"{item}: {len(its) - len(failed)} of {len(its)} ready"
              f" ({sum(x.status == 'done' for x in its)} fetched or made, {human(fetched)} downloaded;"
              f" {sum(x.status == 'present' for x in its)} already present)"
              + (f"; FAILED: {', '.join(x.key for x in failed)}" if failed else f" under {ctx.root}"),
              flush=True)
    failed = [x for x in results.values() if x.status == "failed"]
    if failed:
        raise DownloadError(f"{len(failed)} of {len(results)} rows failed: "
                            + " | ".join(x.note for x in failed))
    return list(results.values())


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
