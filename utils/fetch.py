"""Fetching, verifying and unpacking files for tools/download.py.

* :func:`http_download`: plain HTTP(S) with urllib into ``<file>.part``, resumed with a Range
  request after a dropped connection (within the run, ``retries`` times) or after Ctrl-C (on the
  next run). A server that ignores the Range header restarts the file from byte 0.
* :func:`gdrive_download`: Google Drive files through gdown's own interface (its confirmation
  handling and its resume), never a hand-written scraper. gdown is an optional dependency
  (requirements-download.txt), imported only here.
* :func:`file_digests`: md5 / sha256 in one pass; :func:`sniff_archive`; :func:`extract_tar` /
  :func:`extract_zip`: safe extraction (no absolute paths, no ``..``, no links or devices, nothing
  outside the destination) with the archive's own integrity checks: zip CRC (zipfile checks it as
  each member is read to its end) and a complete tar (every member's data and the end-of-archive
  blocks).
* Every byte written goes through :func:`write_chunk`, so a full disk is one error, whichever
  writer meets it (tests inject ENOSPC there); :func:`disk_usage` is the free-space probe.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import inspect
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, Iterator, Optional

from utils.errors import UserError
from utils.io import describe_file_start, read_file_start

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "eps-reproduction-downloader/1 (python urllib)"
JUNK = ("__MACOSX/", ".DS_Store", "._")  # macOS metadata that zips made on a Mac carry
disk_usage = shutil.disk_usage  # module attribute: tests replace it with a fake


class DownloadError(UserError):
    """A download, verification or extraction that failed; the message says what to do."""


class SourceError(Exception):
    """One source failed (unreachable, refused, wrong size); the next source is tried."""


class DiskFullError(DownloadError):
    pass


class ArchiveError(DownloadError):
    """An archive that fails its own integrity check or holds an unsafe member."""


def human(n: Optional[float]) -> str:
    if n is None:
        return "unknown size"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} bytes"


def _disk_full(path, e: OSError) -> DiskFullError:
    return DiskFullError(f"disk full while writing {path} ({os.strerror(e.errno)}); free some space "
                         f"on that disk (or pass --root on a larger one) and rerun: finished files "
                         f"are kept and a partial download resumes")


@contextlib.contextmanager
def _full_disk_is_one_error(f) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(getattr(f, "name", "a file"), e) from None
        raise


def write_chunk(f, data: bytes) -> None:
    """The one write of every downloaded or extracted byte (a full disk is one clear error)."""
    with _full_disk_is_one_error(f):
        f.write(data)


def _flush(f) -> None:
    with _full_disk_is_one_error(f):
        f.flush()


# ------------------------------------------------------------------------------------------------
# HTTP with Range resume
# ------------------------------------------------------------------------------------------------
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"unreachable ({e.reason})"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection dropped after {len(e.partial)} more bytes"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def http_download(url: str, part: Path, *, size: Optional[int] = None, timeout: float = 60.0,
                  retries: int = 3, retry_wait: float = 2.0,
                  progress: Optional[Callable[[int, Optional[int]], None]] = None) -> Path:
    """Fetch ``url`` into ``part`` (appending to what a previous attempt left there). Returns
    ``part`` when the server has sent everything it announced. Raises SourceError when this source
    cannot deliver (refused, HTTP error, unreachable after ``retries`` tries, wrong size)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            return part
        if size is not None and have > size:  # not this file: start over
            part.unlink()
            have = 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: complete, or not this file
                total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
                if total.isdigit() and int(total) == have:
                    return part
                part.unlink()
                continue
            raise SourceError(_reason(e)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            failures += 1
            if failures > retries:
                raise SourceError(_reason(e)) from None
            _wait(url, e, failures, retries, retry_wait)
            continue
        with resp:
            total = None
            mode = "ab"
            if resp.status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:  # a range we did not ask for: start over
                    part.unlink(missing_ok=True)
                    failures += 1
                    if failures > retries:
                        raise SourceError("the server answered another byte range than asked")
                    continue
                total = int(m.group(3)) if m.group(3) != "*" else None
                if have:
                    logger.info("resuming %s at byte %d (HTTP Range)", part.name, have)
            else:
                if have:
                    logger.info("%s: the server ignored the Range request; starting over", url)
                have, mode = 0, "wb"
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            if size is not None and total is not None and total != size:
                raise SourceError(f"the server offers {total:,} bytes, the table says {size:,}: "
                                  f"not the expected file")
            received = 0
            try:
                with open(part, mode) as f:
                    if progress is not None:
                        progress(have, total)
                    while True:
                        # read1: what has arrived (up to 1 MB), not a wait for a full 1 MB, so a
                        # stall or Ctrl-C keeps every byte received so far in the .part file
                        chunk = resp.read1(CHUNK)
                        if not chunk:
                            break
                        write_chunk(f, chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(have + received, total)
                    _flush(f)
            except DiskFullError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                failures = 1 if received else failures + 1
                if failures > retries:
                    raise SourceError(_reason(e)) from None
                _wait(url, e, failures, retries, retry_wait)
                continue
        now = part.stat().st_size
        if total is None or now >= total:
            return part
        # The server closed the connection early without an error: resume.
        failures = 1 if received else failures + 1
        if failures > retries:
            raise SourceError(f"connection closed at byte {now:,} of {total:,}")
        _wait(url, ConnectionError(f"closed at byte {now:,} of {total:,}"), max(failures, 1),
              retries, retry_wait)


def _wait(url: str, e: BaseException, attempt: int, retries: int, base: float) -> None:
    delay = min(base * 2 ** (attempt - 1), 60.0)
    logger.warning("%s: %s; retry %d of %d in %.0f s (resumes where it stopped)", url, _reason(e),
                   attempt, retries, delay)
    time.sleep(delay)


# ------------------------------------------------------------------------------------------------
# Google Drive through gdown
# ------------------------------------------------------------------------------------------------
def gdrive_download(file_id: str, out: Path, *, timeout: float = 60.0, retries: int = 3,
                    progress: Optional[Callable[[int, Optional[int]], None]] = None) -> Path:
    """Download a Drive file through ``gdown.download`` (resume=True: gdown keeps its own partial
    file next to ``out`` and continues it on the next call)."""
    try:
        import gdown
    except ImportError:
        raise DownloadError("Google Drive files need gdown: pip install -r requirements-download.txt "
                            "(or use --mirror)") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    accepted = inspect.signature(gdown.download).parameters
    kwargs = dict(id=file_id, output=str(out), quiet=True, resume=True)
    # progress / retries / timeout exist in recent gdown only; older ones still download.
    for name, value in (("progress", progress), ("retries", retries), ("timeout", timeout)):
        if name in accepted and value is not None:
            kwargs[name] = value
    try:
        result = gdown.download(**kwargs)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(out, e) from None
        raise SourceError(_reason(e)) from None
    except Exception as e:  # gdown's FileURLRetrievalError / DownloadError, requests' errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"Google Drive: {first}") from None
    if result is None or not out.is_file():
        raise SourceError("Google Drive: gdown returned no file")
    return out


# ------------------------------------------------------------------------------------------------
# verification
# ------------------------------------------------------------------------------------------------
def file_digests(path: Path, algorithms: Iterable[str] = ("sha256",),
                 progress: Optional[Callable[[int], None]] = None) -> Dict[str, str]:
    hashers = {a: hashlib.new(a) for a in dict.fromkeys(algorithms)}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def sha256_of(path) -> str:
    """The sha256 of a file, in hex (the lock files, the model records, the converted weights)."""
    return file_digests(Path(path), ["sha256"])["sha256"]


def sniff_archive(path: Path) -> str:
    """'zip' or 'tar' (also gzip/bz2/xz-compressed tar) from the file's first bytes."""
    head = read_file_start(path, 512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    _, words = describe_file_start(head[:64])
    hint = (" (Google Drive sends a web page instead of the file when its download quota is "
            "reached)" if words.startswith("an HTML page") else "")
    raise ArchiveError(f"{path}: neither a zip nor a tar archive: it starts with {words}{hint}")


# ------------------------------------------------------------------------------------------------
# safe extraction
# ------------------------------------------------------------------------------------------------
def is_junk(name: str) -> bool:
    base = PurePosixPath(name).name
    return name.startswith("__MACOSX/") or "/__MACOSX/" in name or base == ".DS_Store" \
        or base.startswith("._")


def safe_target(dest: Path, name: str, archive: Path) -> Path:
    """dest/name, refused when the member name would leave ``dest``."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in p.parts:
        raise ArchiveError(f"{archive}: member {name!r} points outside the destination; refusing "
                           f"to extract (a safe archive has only relative paths)")
    target = dest.joinpath(*[part for part in p.parts if part not in ("", ".")])
    root = dest.resolve()
    if not (target.resolve() == root or root in target.resolve().parents):
        raise ArchiveError(f"{archive}: member {name!r} resolves outside the destination; refusing")
    return target


def _copy_stream(src, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(target, "wb") as out:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            write_chunk(out, chunk)
            n += len(chunk)
        _flush(out)
    return n


def _wanted(name: str, members: Iterable[str]) -> bool:
    members = tuple(members)
    return not members or PurePosixPath(name).name in members


def extract_tar(archive: Path, dest: Path, members: Iterable[str] = (),
                progress: Optional[Callable[[int], None]] = None) -> int:
    """Extract the regular files and folders of a (compressed) tar into ``dest``; returns the
    number of files. Links, devices and paths leaving ``dest`` are refused. The tar must be
    complete: each member's data present and the end-of-archive blocks after the last one."""
    n = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                if is_junk(m.name) or not (m.isdir() or _wanted(m.name, members)):
                    continue
                target = safe_target(dest, m.name, archive)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif m.isfile():
                    src = tar.extractfile(m)
                    written = _copy_stream(src, target)
                    if written != m.size:
                        raise ArchiveError(f"{archive}: incomplete tar: {m.name} has {written} of "
                                           f"{m.size} bytes")
                    n += 1
                    if progress is not None:
                        progress(written)
                else:
                    kind = "link" if (m.issym() or m.islnk()) else "special file"
                    raise ArchiveError(f"{archive}: member {m.name!r} is a {kind}; refusing to "
                                       f"extract it (only files and folders are expected)")
            # A tar cut exactly between two members reads like a shorter complete one: the
            # end-of-archive marker (two zero blocks) tells them apart.
            tar.fileobj.seek(tar.offset)
            tail = tar.fileobj.read(1024)
            if len(tail) < 1024 or tail.count(0) != 1024:
                raise ArchiveError(f"{archive}: incomplete tar: no end-of-archive blocks after "
                                   f"the last member ({tar.offset:,} bytes read); download it again")
    except ArchiveError:
        raise
    except DiskFullError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(dest, e) from None
        raise ArchiveError(f"{archive}: incomplete or corrupt tar ({_reason(e)}); download it "
                           f"again") from None
    return n


def extract_zip(archive: Path, dest: Path, members: Iterable[str] = (),
                progress: Optional[Callable[[int], None]] = None) -> int:
    """Extract a zip into ``dest`` with the same rules; every member's CRC is checked as it is
    read (zipfile raises on a mismatch), so a corrupt archive never completes."""
    n = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = info.filename
                if is_junk(name) or not (info.is_dir() or _wanted(name, members)):
                    continue
                target = safe_target(dest, name, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"{archive}: member {name!r} is a link; refusing to "
                                       f"extract it (only files and folders are expected)")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as src:
                    written = _copy_stream(src, target)
                n += 1
                if progress is not None:
                    progress(written)
    except (ArchiveError, DiskFullError):
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(dest, e) from None
        raise ArchiveError(f"{archive}: corrupt or incomplete zip ({_reason(e)}); download it "
                           f"again") from None
    return n
