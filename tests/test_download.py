"""tools/download.py (script/download.sh) against a loopback HTTP server, without the internet.

The test builds small fixture archives with the real folder structure (VOCdevkit/VOC2012/...,
SegmentationClassAug/, a saliency archive of unknown inner layout, a tiny MXNet .params, a
prototxt_and_model.zip holding a small init.caffemodel) for real VOC ids, and a fixture table:
the rows of data/downloads.py with the fixtures' sizes, checksums and file counts. The server
(http.server on 127.0.0.1 only) answers Range requests, can drop a connection mid-file and can
serve a corrupted copy; an unreachable source is a closed port. Google Drive rows go through
gdown's own interface, faked at gdown.download.
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from data import downloads as table
from data.downloads import Check, Source
from data.metadata import read_id_list
from tools import download
from utils import fetch
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VOC = table.VOC
COCO = table.COCO


# ------------------------------------------------------------------------------------------------
# loopback server
# ------------------------------------------------------------------------------------------------
class Server:
    """Serves ``files`` {name: bytes} on 127.0.0.1 with Range support. ``drop[name] = n``: the
    next answer for name stops after n bytes and closes the connection (once); ``stall[name] =
    n``: the next answer sends n bytes, then nothing for 3 s (once). A name with its query
    (``drive/uc?id=X``) is served before the bare name; ``headers[name]``: extra headers."""

    def __init__(self):
        self.files, self.drop, self.stall, self.requests = {}, {}, {}, []
        self.headers = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                name = unquote(self.path.lstrip("/"))
                if name not in server.files:
                    name = name.split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                for k, v in server.headers.get(name, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                stall = server.stall.pop(name, None)
                if stall is not None:
                    self.wfile.write(body[:stall])
                    self.wfile.flush()
                    time.sleep(3)
                    self.close_connection = True
                    return
                cut = server.drop.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def asked(self, name):
        return [r for n, r in self.requests if n == name]


def closed_port_url(name: str) -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/{name}"


# ------------------------------------------------------------------------------------------------
# fixture archives with the real folder structure
# ------------------------------------------------------------------------------------------------
def _png(mode="L", value=0, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 8, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(members: dict, gz=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tiny_params() -> bytes:
    """A valid MXNet .params (NDArray list, V1 record) with one named array."""
    arr = np.arange(4, dtype="<f4")
    rec = struct.pack("<II", 0xF993FAC8, 1) + struct.pack("<q", 4) + struct.pack("<ii", 1, 0) \
        + struct.pack("<i", 0) + arr.tobytes()
    name = b"arg:conv1a_weight"
    return struct.pack("<QQQ", 0x112, 0, 1) + rec + struct.pack("<QQ", 1, len(name)) + name


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """{file name: bytes}, the fixture table (JSON path) and the ids they hold."""
    tmp = tmp_path_factory.mktemp("dl")
    lists = {n: read_id_list(REPO / "metadata" / "voc12" / f"{n}.txt") for n in ("train", "train_aug", "val")}
    # the first ids of each list: what preflight looks up (tools/preflight.py SAMPLE)
    ids = list(dict.fromkeys(lists["train_aug"][:6] + lists["train"][:6] + lists["val"][:6]))
    seg_ids = [i for i in ids if i in set(lists["train"]) | set(lists["val"])]
    voc = {"VOCdevkit/": None, "VOCdevkit/VOC2012/": None}
    for i in ids:
        voc[f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg"] = _jpg()
        voc[f"VOCdevkit/VOC2012/Annotations/{i}.xml"] = b"<annotation></annotation>"
    for i in seg_ids:
        voc[f"VOCdevkit/VOC2012/SegmentationClass/{i}.png"] = _png("P", 1)
        voc[f"VOCdevkit/VOC2012/SegmentationObject/{i}.png"] = _png("P", 1)
    voc["VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"] = "\n".join(lists["train"][:6]).encode()
    aug = {f"SegmentationClassAug/{i}.png": _png("L", 1) for i in ids}
    aug["__MACOSX/SegmentationClassAug/._x.png"] = b"junk"  # macOS metadata: skipped
    sal = _tar({**{f"PFAN/VOC2012/maps/{i}.png": _png("L", 200) for i in ids}}, gz=True)
    from test_caffemodel import write_deeplab_caffemodel
    write_deeplab_caffemodel(tmp / "init.caffemodel", n_fc=5)
    dl_zip = _zip({"prototxt_and_model.txt": b"readme", "train2_iter_20000.caffemodel": b"not used",
                   "init.caffemodel": (tmp / "init.caffemodel").read_bytes()})
    files = {"VOCtrainval_11-May-2012.tar": _tar(voc), "SegmentationClassAug.zip": _zip(aug),
             "EPS_saliency_voc12": sal, "ilsvrc-cls_rna-a1_cls1000_ep-0001.params": tiny_params(),
             "prototxt_and_model.zip": dl_zip}
    R = table.ROWS
    voc_tar = files["VOCtrainval_11-May-2012.tar"]
    rows = {
        "voc12_images": dataclasses.replace(
            R["voc12_images"], size=len(voc_tar),
            checksums=(("md5", hashlib.md5(voc_tar).hexdigest()), ("sha256", sha256(voc_tar))),
            checksum_cite="fixture",
            checks=(Check(f"{VOC}/JPEGImages", ".jpg", count=len(ids), ids=tuple(ids)),
                    Check(f"{VOC}/SegmentationClass", ".png", count=len(seg_ids)))),
        "voc12_masks": dataclasses.replace(  # no published checksum: recorded at first download
            R["voc12_masks"], checks=(Check(f"{VOC}/SegmentationClassAug", ".png", count=len(ids),
                                            ids=tuple(ids)),)),
        "voc12_saliency": dataclasses.replace(
            R["voc12_saliency"], checks=(Check(f"{VOC}/SALImages", ".png", ids=tuple(ids)),)),
        "imagenet_resnet38": dataclasses.replace(
            R["imagenet_resnet38"], post=(),
            checksums=(("md5", hashlib.md5(files["ilsvrc-cls_rna-a1_cls1000_ep-0001.params"]).hexdigest()),),
            checksum_cite="fixture", checks=R["imagenet_resnet38"].checks[:1]),
        "deeplab_init": dataclasses.replace(
            R["deeplab_init"],
            post=(("caffemodel_to_pth", "weights/deeplabv1_resnet101-coco.pth", "deeplabv2_small", "5"),),
            checks=(Check("weights/deeplabv1_resnet101-coco.pth", load="deeplab_init:deeplabv2_small"),)),
    }
    # small estimates: the free-disk check must not ask for the real data's gigabytes here
    rows = {k: dataclasses.replace(r, estimate=50_000, unpacked=100_000) for k, r in rows.items()}
    items = {"voc12": table.ITEMS["voc12"], "weights": table.ITEMS["weights"]}
    path = tmp / "fixture_table.json"
    path.write_text(table.table_to_json(rows, items))
    return dict(files=files, table=path, rows=rows, items=items, ids=ids, seg_ids=seg_ids, tmp=tmp)


@pytest.fixture()
def server(fixtures):
    s = Server()
    s.files.update(fixtures["files"])
    yield s
    s.close()


def run(argv, table_path, monkeypatch):
    monkeypatch.setenv(download.TABLE_ENV, str(table_path))
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    from utils.cli import build_parser
    args = build_parser(download.get_args_parser).parse_args([str(a) for a in argv])
    return download.main(args)


def fail(argv, table_path, monkeypatch) -> str:
    with pytest.raises(UserError) as e:
        run(argv, table_path, monkeypatch)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------
def test_voc12_download_lays_out_what_the_scripts_read(fixtures, server, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    results = run(["voc12", "--root", root, "--mirror", server.url, "--retry-wait", "0"],
                  fixtures["table"], monkeypatch)
    assert {r.key: r.status for r in results} == {k: "done" for k in table.ITEMS["voc12"]}
    voc = root / VOC
    ids = fixtures["ids"]
    assert sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg")) == sorted(ids)
    assert len(list((voc / "SegmentationClass").glob("*.png"))) == len(fixtures["seg_ids"])
    assert sorted(p.stem for p in (voc / "SegmentationClassAug").iterdir()) == sorted(ids)  # no __MACOSX
    assert sorted(p.stem for p in (voc / "SALImages").iterdir()) == sorted(ids)  # found by id
    assert (voc / "Annotations").is_dir() and (voc / "ImageSets" / "Segmentation" / "train.txt").is_file()
    assert (root / "weights" / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params").read_bytes() == \
        fixtures["files"]["ilsvrc-cls_rna-a1_cls1000_ep-0001.params"]
    # the DeepLab init: converted from the caffemodel, loaded by train_seg's own loader
    from network.deeplab import build_deeplab, load_init_weights
    report = load_init_weights(build_deeplab("deeplabv2_small", 21), root / "weights" / "deeplabv1_resnet101-coco.pth")
    assert report["kind"] == "deeplab" and report["dropped"] == ["fc.bias", "fc.weight"]
    assert not (root / "weights" / "init.caffemodel").exists()  # only the converted file stays
    # the lock files: sha256 of every download (recorded where none is published)
    lock = json.loads((root / "datasets" / "downloads.lock.json").read_text())["rows"]
    files = fixtures["files"]
    assert lock["voc12_images"]["sha256"] == sha256(files["VOCtrainval_11-May-2012.tar"])
    assert lock["voc12_images"]["md5"] == hashlib.md5(files["VOCtrainval_11-May-2012.tar"]).hexdigest()
    assert lock["voc12_masks"]["sha256"] == sha256(files["SegmentationClassAug.zip"])
    assert "recorded" in lock["voc12_masks"]["verified"]
    wlock = json.loads((root / "weights" / "downloads.lock.json").read_text())["rows"]
    pth = (root / "weights" / "deeplabv1_resnet101-coco.pth").read_bytes()
    assert wlock["deeplab_init"]["outputs"] == {"weights/deeplabv1_resnet101-coco.pth": sha256(pth)}
    # archives removed after extraction, no staging left
    assert not [p for p in (root / "datasets" / ".downloads").iterdir()]
    out = capsys.readouterr().out
    assert "voc12: 5 of 5 ready (5 fetched or made" in out
    assert re.search(r"5 of 5 rows to fetch or make under .*: to download: [\d.]+ KB \+ about", out)
    # a rerun: everything present and verified, nothing asked of the server
    n = len(server.requests)
    results = run(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert {r.status for r in results} == {"present"} and len(server.requests) == n
    assert "voc12: 5 of 5 ready (0 fetched or made, 0 bytes downloaded; 5 already present)" in \
        capsys.readouterr().out


def test_corrupt_archive_is_refused_with_one_line_and_never_extracted(fixtures, server, tmp_path,
                                                                      monkeypatch):
    root = tmp_path / "root"
    good = fixtures["files"]["VOCtrainval_11-May-2012.tar"]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    server.files["VOCtrainval_11-May-2012.tar"] = bytes(bad)
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    part = f"{root}/datasets/.downloads/VOCtrainval_11-May-2012.tar"
    assert f"{part}: checksum mismatch: md5 expected {hashlib.md5(good).hexdigest()} (fixture), " \
           f"actual {hashlib.md5(bytes(bad)).hexdigest()}" in msg
    assert f"kept aside as {part}.corrupt, nothing was extracted" in msg
    assert Path(part + ".corrupt").read_bytes() == bytes(bad)
    assert not (root / VOC / "JPEGImages").exists()
    assert not list((root / "datasets" / ".downloads").glob("staging-*"))
    # the other rows of the item were still fetched; the summary names the failure
    assert (root / VOC / "SegmentationClassAug").is_dir()
    # fixed at the source: the rerun downloads it again and succeeds
    server.files["VOCtrainval_11-May-2012.tar"] = good
    results = run(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert {r.key: r.status for r in results}["voc12_images"] == "done"


def test_recorded_checksum_is_verified_on_the_next_download(fixtures, server, tmp_path, monkeypatch):
    """No published checksum: the first download's sha256 goes into the lock file, and a later
    download (another machine with the lock file, or a rerun) must match it."""
    root = tmp_path / "root"
    run(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    recorded = json.loads((root / "datasets" / "downloads.lock.json").read_text())["rows"]["voc12_masks"]
    shutil.rmtree(root / VOC / "SegmentationClassAug")
    server.files["SegmentationClassAug.zip"] = _zip({f"SegmentationClassAug/{i}.png": _png("L", 2)
                                                     for i in fixtures["ids"]})
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert f"sha256 expected {recorded['sha256']} (recorded in {root}/datasets/downloads.lock.json" in msg
    assert "actual " + sha256(server.files["SegmentationClassAug.zip"]) in msg
    assert not (root / VOC / "SegmentationClassAug").exists()


def test_dropped_connection_resumes_with_a_range_request(fixtures, server, tmp_path, monkeypatch):
    root = tmp_path / "root"
    name = "VOCtrainval_11-May-2012.tar"
    server.drop[name] = 3000
    run(["voc12", "--root", root, "--mirror", server.url, "--retry-wait", "0"], fixtures["table"],
        monkeypatch)
    assert server.asked(name) == [None, "bytes=3000-"]
    assert (root / VOC / "JPEGImages").is_dir()


def test_a_stalled_connection_keeps_what_arrived_and_resumes_there(server, tmp_path):
    """A connection that goes silent (a timeout, or Ctrl-C while waiting) must not lose the
    bytes that arrived before: the retry asks for the rest only. (Reading in 1 MB blocks that
    wait to be full lost them, so a link that stalls more often than every MB never finished.)"""
    data = bytes(range(256)) * 64
    server.files["f.bin"] = data
    server.stall["f.bin"] = 5000
    part = tmp_path / "f.bin.part"
    fetch.http_download(f"{server.url}/f.bin", part, size=len(data), timeout=0.5, retries=1,
                        retry_wait=0)
    assert server.asked("f.bin") == [None, "bytes=5000-"]
    assert part.read_bytes() == data


def test_interrupted_run_resumes_on_the_next_run(fixtures, server, tmp_path, monkeypatch):
    """The first run loses its connection with no retry left (as after Ctrl-C): the partial file
    stays, and the next run asks only for the rest."""
    root = tmp_path / "root"
    name = "SegmentationClassAug.zip"
    server.drop[name] = 100
    msg = fail(["voc12", "--root", root, "--mirror", server.url, "--retries", "0"],
               fixtures["table"], monkeypatch)
    assert f"{name} could not be fetched" in msg and "connection closed at byte 100" in msg
    assert (root / "datasets" / ".downloads" / f"{name}.part").stat().st_size == 100
    run(["voc12", "--root", root, "--mirror", server.url, "--keep-archives"], fixtures["table"],
        monkeypatch)
    assert server.asked(name) == [None, "bytes=100-"]
    downloaded = root / "datasets" / ".downloads"
    assert (downloaded / name).read_bytes() == fixtures["files"][name]  # --keep-archives
    assert not (downloaded / f"{name}.part").exists()
    assert len(list((root / VOC / "SegmentationClassAug").iterdir())) == len(fixtures["ids"])


def test_unreachable_source_hands_over_to_the_second_one(fixtures, server, tmp_path, monkeypatch,
                                                         caplog):
    row = fixtures["rows"]["voc12_masks"]
    dead, dead2 = closed_port_url(row.file), f"{server.url}/missing/{row.file}"
    # three sources, as VOC's images have: each hand-over names the rank of both sources
    two = dataclasses.replace(row, sources=(Source("http", dead, "dead"), Source("http", dead2, "404"),
                                            Source("http", f"{server.url}/{row.file}", "alive")))
    # no mirror here: every row names the server as its source, the masks a dead one first
    rows = {k: dataclasses.replace(r, sources=(Source("http", f"{server.url}/{r.file}", "fixture"),))
            for k, r in fixtures["rows"].items()}
    rows["voc12_masks"] = two
    path = tmp_path / "table.json"
    path.write_text(table.table_to_json(rows, fixtures["items"]))
    root = tmp_path / "root"
    args = ["voc12", "--root", root, "--retries", "0"]
    run(args, path, monkeypatch)
    assert (root / VOC / "SegmentationClassAug").is_dir()
    assert f"source {dead} failed (" in caplog.text and f"trying the second source {dead2}\n" in caplog.text
    assert f"second source {dead2} failed (" in caplog.text
    assert f"trying the third source {server.url}/{row.file}\n" in caplog.text
    # no source left: the error names the manual step
    shutil.rmtree(root / VOC / "SegmentationClassAug")
    rows["voc12_masks"] = dataclasses.replace(row, sources=(Source("http", dead, "dead"),))
    path.write_text(table.table_to_json(rows, fixtures["items"]))
    msg = fail(args, path, monkeypatch)
    assert f"{dead}: unreachable (" in msg and "no second source is known" in msg
    assert "Tencent Weiyun copy (https://share.weiyun.com/5NmJ6Rk" in msg


def test_a_destination_on_another_disk_is_copied_into_place(fixtures, server, tmp_path,
                                                            monkeypatch):
    """datasets/VOCdevkit symlinked to another disk: the rename out of the staging folder fails
    with EXDEV (simulated here, for the moves into place only); the folders are copied beside
    their destination and renamed into place, and the staging copy is removed."""
    real = os.replace

    def replace(src, dst):
        if "staging-" in str(src) and "staging-" not in str(dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(download.os, "replace", replace)
    root = tmp_path / "root"
    results = run(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert {r.status for r in results} == {"done"}
    voc = root / VOC
    assert sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg")) == sorted(fixtures["ids"])
    assert sorted(p.stem for p in (voc / "SALImages").iterdir()) == sorted(fixtures["ids"])
    assert not [p for p in voc.iterdir() if p.name.startswith(".")]
    assert not list((root / "datasets" / ".downloads").iterdir())


def test_file_system_errors_of_a_row_are_one_line_naming_the_path(fixtures, server, tmp_path,
                                                                   monkeypatch):
    """Permission denied on an existing sub-folder (simulated: the tests run as root, whom
    permissions do not stop) and a file where a folder belongs (real): the row fails in one
    line naming the path and the problem, the other rows are done, no traceback."""
    real = os.replace

    def replace(src, dst):
        if "staging-" in str(src) and "staging-" not in str(dst) and "SALImages" in str(dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(download.os, "replace", replace)
    root = tmp_path / "root"
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    sal = root / VOC / "SALImages"
    assert msg.startswith("1 of 5 rows failed: voc12_saliency: ")
    assert re.search(rf"staging-voc12_saliency/placed/{VOC}/SALImages -> {re.escape(str(sal))}: "
                     r"permission denied: fix the folder's permissions or choose another folder "
                     r"\(\[Errno 13\] Permission denied\)$", msg), msg
    assert (root / VOC / "JPEGImages").is_dir() and not sal.exists()
    monkeypatch.setattr(download.os, "replace", real)
    # a file where the saliency maps' parent folder belongs
    shutil.rmtree(root / VOC)
    root.joinpath(VOC).write_text("not a folder")
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert msg.startswith("3 of 5 rows failed: voc12_images: ")
    assert (f"{root / VOC}: a file stands where a folder belongs: move it away and rerun ([Errno "
            f"17] File exists)") in msg, msg
    assert "Traceback" not in msg


def test_full_disk_is_one_line_and_the_partial_file_stays(fixtures, server, tmp_path, monkeypatch):
    real = fetch.write_chunk
    written = []

    class Full:
        def __init__(self, f):
            self.name = f.name

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_until_full(f, data):
        if sum(written) >= 2000:
            return real(Full(f), data)
        written.append(len(data))
        return real(f, data)

    monkeypatch.setattr(fetch, "write_chunk", write_until_full)
    root = tmp_path / "root"
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert "disk full while writing" in msg and "No space left on device" in msg
    assert "a partial download resumes" in msg
    assert not (root / VOC / "JPEGImages").exists()


def test_a_caffemodel_that_does_not_convert_is_one_line_and_nothing_is_placed(fixtures, server,
                                                                             tmp_path, monkeypatch):
    server.files["prototxt_and_model.zip"] = _zip({"init.caffemodel": b"<!DOCTYPE html><html>moved</html>"})
    root = tmp_path / "root"
    msg = fail(["weights", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert "1 of 2 rows failed: deeplab_init: " in msg
    assert "init.caffemodel: not a Caffe model (it starts with an HTML page" in msg
    assert not list((root / "weights").glob("*.pth")) and not (root / "weights" / "init.caffemodel").exists()
    assert (root / "weights" / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params").is_file()  # the other row


def test_free_disk_is_checked_before_anything_is_fetched(fixtures, server, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fetch, "disk_usage", lambda p: Usage(10 ** 9, 10 ** 9 - 5000, 5000))
    root = tmp_path / "root"
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert re.search(r"not enough free disk: [\d.]+ [KMG]B needed on the disk of .*\([\d.]+ KB to "
                     r"download \+ about [\d.]+ KB of unpublished size, then extracted\), 5.0 KB "
                     r"free; free some space or pass --root on a larger disk", msg), msg
    assert server.requests == [] and not (root / "datasets").exists()


def test_free_disk_is_measured_on_each_destinations_own_disk(tmp_path, monkeypatch):
    """datasets/VOCdevkit linked to another disk: the extracted data is charged to that disk
    (by its real path), the archives and the staging copy to the disk of datasets/.downloads;
    a shortage on the linked disk is refused naming it."""
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "datasets").mkdir(parents=True)
    (other / "VOCdevkit").mkdir(parents=True)
    (root / "datasets" / "VOCdevkit").symlink_to(other / "VOCdevkit", target_is_directory=True)
    real_stat = os.stat

    def stat(path, *a, **k):  # everything under other/ is on a second device
        st = real_stat(path, *a, **k)
        if os.path.realpath(path).startswith(str(other)):
            return os.stat_result(st[:2] + (st.st_dev + 1,) + st[3:])
        return st

    monkeypatch.setattr(os, "stat", stat)
    rows = {k: table.ROWS[k] for k in ("voc12_images", "voc12_masks", "voc12_saliency")}
    ctx = download.Ctx(root=root, rows=rows, items={"voc12": tuple(rows)})
    todo = list(rows.values())
    known, estimated, need = download.disk_plan(ctx, todo)
    fetched = {r.key: r.size if r.size is not None else r.estimate for r in todo}
    assert need == {
        other / "VOCdevkit": sum(r.unpacked for r in todo),  # everything extracted lands there
        root / "datasets": max(fetched[r.key] + r.unpacked for r in todo)}  # archive + staging
    # enough room where the archives go, too little on the linked disk: refused, naming it
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fetch, "disk_usage", lambda p: Usage(10 ** 13, 0, (
        10 ** 9 if str(p).startswith(str(other)) else 10 ** 12)))
    with pytest.raises(download.DownloadError, match=rf"needed on the disk of {re.escape(str(other))}/"
                                                     rf"VOCdevkit \("):
        download.check_disk(ctx, todo)


def test_dry_run_lists_every_input_and_fetches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(download.TABLE_ENV, raising=False)
    root = tmp_path / "root"
    from utils.cli import build_parser
    download.main(build_parser(download.get_args_parser).parse_args(["--dry-run", "all", "--root", str(root)]))
    out = capsys.readouterr().out
    for row in table.ROWS.values():
        block = out[out.index(f"] {row.key}: "):]
        block = block[:block.index("    status")]
        for s in row.sources:
            assert s.url in block
        assert ("    size" in block) == bool(row.file)
        assert "    checksum   " in block and "    integrity  " in block
        for p in row.place:
            assert str(root / p.dest) in block
        if row.checksums:
            assert row.checksums[0][1] in block
        elif row.file:
            assert "none published: sha256 recorded at first download" in block
    # every input of the four pipelines and of script/eval_released.sh
    used = {u for r in table.ROWS.values() for u in r.used_by}
    assert used == {"voc12_cls.sh", "voc12_eps.sh", "coco_cls.sh", "coco_eps.sh", "eval_released.sh"}
    assert "15 of 15 rows to fetch or make" in out
    # sources by rank: VOC's images have three
    voc = out[out.index("] voc12_images: "):]
    assert re.search(r"\n    source     http://host\.robots.*\n    second     https://thor\.robots.*\n"
                     r"    third      http://pjreddie\.com/", voc), voc[:1000]
    assert not root.exists()


def test_google_drive_rows_use_gdown(fixtures, tmp_path, monkeypatch, capsys):
    gdown = pytest.importorskip("gdown")
    calls = []
    row = fixtures["rows"]["voc12_saliency"]
    file_id = row.sources[0].where

    def fake_download(url=None, output=None, quiet=False, id=None, resume=False, progress=None,
                      retries=0, timeout=None, **kw):
        calls.append(dict(id=id, resume=resume))
        if id != file_id:
            raise gdown.exceptions.FileURLRetrievalError(
                "Failed to retrieve file url:\n\n\tToo many users have viewed or downloaded this "
                "file recently.\n\nYou may still be able to access the file from the browser")
        data = fixtures["files"][row.file]
        Path(output).write_bytes(data)
        if progress is not None:
            progress(len(data), len(data))
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    items = {"sal": ("voc12_saliency",)}
    path = tmp_path / "t.json"
    path.write_text(table.table_to_json({"voc12_saliency": row}, items))
    root = tmp_path / "root"
    run(["sal", "--root", root], path, monkeypatch)
    assert calls == [dict(id=file_id, resume=True)]
    assert len(list((root / VOC / "SALImages").iterdir())) == len(fixtures["ids"])
    # Drive refuses (quota): the error says so and names the manual step
    bad = dataclasses.replace(row, sources=(Source("gdrive", "WRONGID", "x"),))
    shutil.rmtree(root / VOC / "SALImages")
    path.write_text(table.table_to_json({"voc12_saliency": bad}, items))
    msg = fail(["sal", "--root", root], path, monkeypatch)
    assert "Google Drive: Failed to retrieve file url:" in msg
    assert "open https://drive.google.com/file/d/19AjSmgdMlIZH4FXVZ5zjlUZcoZZCkwrI/view in a browser" in msg


def test_a_root_that_cannot_be_written_is_one_line_before_fetching(fixtures, server, tmp_path,
                                                                   monkeypatch):
    (tmp_path / "a_file").write_text("x")
    msg = fail(["voc12", "--root", tmp_path / "a_file" / "root", "--mirror", server.url],
               fixtures["table"], monkeypatch)
    assert f"--root {tmp_path / 'a_file' / 'root'}: {tmp_path / 'a_file'} is a file, not a folder" in msg
    assert server.requests == []


def test_google_drive_through_gdown_faked_at_the_network_boundary(fixtures, server, tmp_path,
                                                                  monkeypatch):
    """The real gdown, its requests to Google rerouted to the loopback server at requests'
    transport (nothing else is faked): Drive's file answer is downloaded, extracted and laid out;
    Drive's quota page is one line naming the manual step."""
    pytest.importorskip("gdown")
    import requests
    from urllib.parse import urlsplit
    row = fixtures["rows"]["voc12_saliency"]
    file_id = row.sources[0].where
    name = f"drive/uc?id={file_id}"
    server.files[name] = fixtures["files"][row.file]
    server.headers[name] = {"Content-Type": "application/octet-stream",
                            "Content-Disposition": 'attachment; filename="Saliency.tar.gz"'}
    server.files["drive/uc?id=QUOTA"] = (b"<html><head><title>Google Drive - Quota exceeded"
                                         b"</title></head><body>Too many users</body></html>")
    server.headers["drive/uc?id=QUOTA"] = {"Content-Type": "text/html; charset=utf-8"}
    asked = []
    real_send = requests.adapters.HTTPAdapter.send

    def send(self, request, **kw):
        parts = urlsplit(request.url)
        assert parts.hostname.endswith("google.com"), f"no network in tests: {request.url}"
        asked.append(request.url)
        request.url = f"{server.url}/drive{parts.path}?{parts.query}"
        return real_send(self, request, **{**kw, "proxies": {}})

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # gdown's cookie file
    items = {"sal": ("voc12_saliency",)}
    path = tmp_path / "t.json"
    path.write_text(table.table_to_json({"voc12_saliency": row}, items))
    root = tmp_path / "root"
    run(["sal", "--root", root, "--retries", "0"], path, monkeypatch)
    assert asked == [f"https://drive.google.com/uc?id={file_id}"]
    assert sorted(p.stem for p in (root / VOC / "SALImages").iterdir()) == sorted(fixtures["ids"])
    lock = json.loads((root / "datasets" / "downloads.lock.json").read_text())["rows"]
    assert lock["voc12_saliency"]["sha256"] == sha256(fixtures["files"][row.file])
    # the quota page: gdown refuses it, and the error names the manual step
    shutil.rmtree(root / VOC / "SALImages")
    quota = dataclasses.replace(row, sources=(Source("gdrive", "QUOTA", "x"),))
    path.write_text(table.table_to_json({"voc12_saliency": quota}, items))
    msg = fail(["sal", "--root", root, "--retries", "0"], path, monkeypatch)
    assert "Google Drive: Failed to retrieve file url" in msg
    assert f"save the file as <root>/datasets/.downloads/{row.file} and rerun" in msg
    assert not (root / VOC / "SALImages").exists()


def test_existing_incomplete_destination_is_refused_before_fetching(fixtures, server, tmp_path,
                                                                     monkeypatch):
    root = tmp_path / "root"
    (root / VOC / "JPEGImages").mkdir(parents=True)
    (root / VOC / "JPEGImages" / "x.jpg").write_bytes(b"")
    msg = fail(["voc12", "--root", root, "--mirror", server.url], fixtures["table"], monkeypatch)
    assert f"voc12_images: {root / VOC / 'JPEGImages'} exists but is not complete (" in msg
    assert "move it away and rerun" in msg and server.requests == []


def coco_fixture(fixtures) -> tuple:
    """COCO-2014-shaped archives for 2 train and 1 val image (real ids of metadata/coco) and a
    table whose coco rows expect them; the labels go under --root, not into the repository."""
    from data.metadata import read_class_names
    cat_ids = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
               *range(72, 83), *range(84, 91)]  # the 80 COCO ids (docs reference 3.4)
    names = read_class_names(REPO / "metadata" / "coco" / "labels.txt")[1:]
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in zip(cat_ids, names)]
    split_ids = {"train": [9, 25], "val": [42]}
    files, keys = {}, {}
    ann = {}
    for split, nums in split_ids.items():
        keys[split] = [f"COCO_{split}2014_{n:012d}" for n in nums]
        files[f"{split}2014.zip"] = _zip({f"{split}2014/{k}.jpg": _jpg() for k in keys[split]})
        images = [{"id": n, "file_name": f"{k}.jpg", "height": 6, "width": 8}
                  for n, k in zip(nums, keys[split])]
        anns = [{"id": 100 + n, "image_id": n, "category_id": 18, "iscrowd": 0, "area": 12.0,
                 "bbox": [1, 1, 4, 3], "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]} for n in nums]
        ann[f"annotations/instances_{split}2014.json"] = json.dumps(
            {"images": images, "annotations": anns, "categories": cats}).encode()
    files["annotations_trainval2014.zip"] = _zip(ann)
    files["EPS_saliency_coco"] = _zip({f"SAL/COCO/{k}.png": _png("L", 255) for k in keys["train"]})
    R, C = table.ROWS, table.COCO
    fixed = lambda key, **kw: dataclasses.replace(  # noqa: E731
        R[key], size=len(files[R[key].file]), checksums=(("sha256", sha256(files[R[key].file])),),
        estimate=50_000, unpacked=100_000, **kw)
    rows = {
        "coco_train2014": fixed("coco_train2014", checks=(
            Check(f"{C}/train2014", ".jpg", count=2, ids=tuple(keys["train"])),)),
        "coco_val2014": fixed("coco_val2014", checks=(
            Check(f"{C}/val2014", ".jpg", count=1, ids=tuple(keys["val"])),)),
        "coco_annotations": fixed("coco_annotations"),
        "coco_masks": dataclasses.replace(R["coco_masks"], estimate=50_000, unpacked=100_000, checks=(
            Check(f"{C}/SegmentationClass/train2014", ".png", ids=tuple(keys["train"])),
            Check(f"{C}/SegmentationClass/val2014", ".png", ids=tuple(keys["val"])))),
        "coco_saliency": dataclasses.replace(R["coco_saliency"], estimate=50_000, unpacked=100_000,
                                             checks=(Check(f"{C}/SALImages", ".png", ids=tuple(keys["train"])),)),
        "coco_labels": dataclasses.replace(
            R["coco_labels"], post=(("coco_labels", C, "labels/image_labels.txt"),),
            checks=(Check("labels/image_labels.txt", load="labels", ids=tuple(keys["train"] + keys["val"])),)),
        "imagenet_resnet38": fixtures["rows"]["imagenet_resnet38"],
        "deeplab_init": fixtures["rows"]["deeplab_init"],
    }
    return files, rows, keys


def test_coco_download_makes_labels_and_masks(fixtures, server, tmp_path, monkeypatch, capsys):
    files, rows, keys = coco_fixture(fixtures)
    server.files.update(files)
    path = tmp_path / "coco.json"
    path.write_text(table.table_to_json(rows, {"coco": table.ITEMS["coco"]}))
    root = tmp_path / "root"
    run(["coco", "--root", root, "--mirror", server.url, "--coco-masks", "make", "--workers", "0"],
        path, monkeypatch)
    coco = root / table.COCO
    assert sorted(p.stem for p in (coco / "train2014").iterdir()) == keys["train"]
    assert sorted(p.stem for p in (coco / "SALImages").iterdir()) == keys["train"]
    for split in ("train", "val"):  # tools/make_coco_masks.py: category 18 (dog) = index 16, + 1
        for k in keys[split]:
            mask = np.asarray(Image.open(coco / "SegmentationClass" / f"{split}2014" / f"{k}.png"))
            assert set(np.unique(mask)) == {0, 17}
    labels = (root / "labels" / "image_labels.txt").read_text().splitlines()
    assert [line for line in labels if not line.startswith("#")] == \
        [f"{k} 16" for k in keys["train"] + keys["val"]]
    assert "coco: 8 of 8 ready" in capsys.readouterr().out
    assert not (REPO / "labels").exists()


# ------------------------------------------------------------------------------------------------
# archive safety and integrity (utils/fetch.py)
# ------------------------------------------------------------------------------------------------
def test_unsafe_and_incomplete_archives_are_refused(tmp_path):
    def archive(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    dest = tmp_path / "out"
    with pytest.raises(fetch.ArchiveError, match="points outside the destination"):
        fetch.extract_tar(archive("a.tar", _tar({"../evil.txt": b"x"})), dest)
    with pytest.raises(fetch.ArchiveError, match="points outside the destination"):
        fetch.extract_zip(archive("a.zip", _zip({"/abs/evil.txt": b"x"})), dest)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(fetch.ArchiveError, match="is a link; refusing"):
        fetch.extract_tar(archive("l.tar", buf.getvalue()), dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "link").exists()
    # a tar cut between two members reads like a complete shorter one: the end blocks tell
    full = _tar({"a/1.bin": b"1" * 600, "a/2.bin": b"2" * 600})
    cut = full[:512 + 1024]  # header + data of the first member only
    with pytest.raises(fetch.ArchiveError, match="incomplete tar: no end-of-archive blocks"):
        fetch.extract_tar(archive("cut.tar", cut), tmp_path / "o1")
    with pytest.raises(fetch.ArchiveError, match="incomplete or corrupt tar"):
        fetch.extract_tar(archive("cut2.tar", full[:512 + 300]), tmp_path / "o2")
    assert fetch.extract_tar(archive("ok.tar", full), tmp_path / "o3") == 2
    gz = gzip.compress(full)
    with pytest.raises(fetch.ArchiveError, match="incomplete or corrupt tar"):
        fetch.extract_tar(archive("cut.tgz", gz[: len(gz) // 2]), tmp_path / "o4")
    # a zip whose member fails its CRC
    z = bytearray(_zip({"d/x.bin": bytes(range(256)) * 40}))
    z[z.index(b"d/x.bin") + 7 + 20] ^= 0xFF  # a byte of the compressed data
    with pytest.raises(fetch.ArchiveError, match="corrupt or incomplete zip"):
        fetch.extract_zip(archive("crc.zip", bytes(z)), tmp_path / "o5")
    with pytest.raises(fetch.ArchiveError, match="neither a zip nor a tar archive: it starts with an HTML page"):
        fetch.sniff_archive(archive("page", b"<!DOCTYPE html><html>quota</html>" + b" " * 600))


def test_hints_name_the_download_command_and_sources_live_in_one_place():
    for key, text in table.DOWNLOADS.items():
        item = text.rsplit("bash script/download.sh ", 1)[1]
        assert item in table.ITEMS, key
        assert table.hint(key).endswith("(README 'Downloads')")
    assert {r.group for r in table.ROWS.values()} == set(table.DOWNLOADS)
    for item, keys in table.ITEMS.items():
        assert set(keys) <= set(table.ROWS), item
    # every file check is of a kind tools/download.py knows (an unknown one would pass unchecked)
    for row in table.ROWS.values():
        for c in row.checks:
            assert not c.load or c.load.partition(":")[0] in download.LOAD_KINDS, (row.key, c.load)
    with pytest.raises(ValueError, match="unknown check kind 'resnet38_trunk'"):
        download._load_failure(None, Check("x", load="resnet38_trunk"), table.ROWS["imagenet_resnet38"],
                               Path("x"))
    # the manual step names the file as the next run looks for it in .downloads/ (fetch_file)
    for row in table.ROWS.values():
        if row.file:
            assert row.file in row.manual and ".downloads/" in row.manual, row.key
        if any(s.kind == "gdrive" for s in row.sources):
            assert f".downloads/{row.file} and rerun" in row.manual, row.key
    # every source URL and Drive id is written in data/downloads.py only
    needles = {s.where for r in table.ROWS.values() for s in r.sources}
    for path in [*REPO.glob("*.py"), *REPO.glob("*/*.py"), *REPO.glob("script/*.sh")]:
        if path.name in ("downloads.py",) or path.parent.name == "tests":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for n in needles:
            assert n not in text, (path, n)


# ------------------------------------------------------------------------------------------------
# end to end: script/download.sh in a copy of the repository, then the pipeline's check
# ------------------------------------------------------------------------------------------------
def repo_copy(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.mark.slow
def test_download_sh_then_check_only_finds_every_input(fixtures, server, tmp_path):
    repo = repo_copy(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATASET_ROOT", "WEIGHTS", "SEG_INIT", "SALIENCY_ROOT", "METADATA_DIR",
                        "SAVE_ROOT", "STAGES", "NGPUS", "DOWNLOAD_ROOT", "CHECK_ONLY")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", EPS_MIRROR=server.url,
               EPS_DOWNLOAD_TABLE=str(fixtures["table"]))
    sh = lambda *a, **e: subprocess.run(["bash", *map(str, a)], cwd=repo, env={**env, **e},  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    # a corrupted archive: one error line, nothing extracted
    good = server.files["VOCtrainval_11-May-2012.tar"]
    bad = bytearray(good)
    bad[700] ^= 0x01  # one bit of the first image
    server.files["VOCtrainval_11-May-2012.tar"] = bytes(bad)
    proc = sh("script/download.sh", "voc12", "--retry-wait", "0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("download.py: error:")]
    assert len(errors) == 1 and "checksum mismatch: md5 expected" in errors[0]
    assert "nothing was extracted" in errors[0]
    assert "Traceback" not in proc.stderr and not (repo / VOC / "JPEGImages").exists()
    server.files["VOCtrainval_11-May-2012.tar"] = good
    proc = sh("script/download.sh", "voc12")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "voc12: 5 of 5 ready" in proc.stdout
    # the pipeline finds every input with no path given (the repo-relative defaults). The
    # fixture weights are tiny stand-ins, so preflight, which reads every weights file, refuses
    # their shapes for the paper's networks, and only that: nothing is missing
    proc = sh("script/voc12_eps.sh", CHECK_ONLY="1", DEVICE="cpu")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 2, proc.stderr
    assert problems[0].startswith("  - train: ") and "weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params: does not fit resnet38_eps" in problems[0]
    assert problems[1].startswith("  - seg: ") and "weights/deeplabv1_resnet101-coco.pth: shape mismatch" in problems[1]
    assert "not found" not in proc.stderr
    # with networks the stand-ins fit (the DeepLab init was converted for deeplabv2_small; the
    # small classifier trains from scratch), the same defaults pass
    proc = sh("script/voc12_eps.sh", CHECK_ONLY="1", DEVICE="cpu", NETWORK="small_eps",
              SEG_ARCH="deeplabv2_small", WEIGHTS="none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing was run" in proc.stdout
    assert "error" not in proc.stderr.lower()


@pytest.mark.slow
def test_eval_released_without_arguments_evaluates_what_download_fetched(tmp_path):
    """script/eval_released.sh with no argument: every released checkpoint found where
    `download.sh released` puts them, on the dataset root `download.sh voc12` lays out, in one
    table; the missing ones are rows naming the command that fetches them."""
    import torch
    from network import build_network
    root = tmp_path / "root"
    ids = read_id_list(REPO / "metadata" / "voc12" / "train.txt")[:3]
    voc = root / VOC
    rng = np.random.default_rng(0)
    for i in ids:
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (voc / "SegmentationClassAug").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 21, (40, 56), dtype=np.uint8), mode="L").save(
            voc / "SegmentationClassAug" / f"{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(ids) + "\n")
    (root / "weights").mkdir()
    torch.manual_seed(0)
    torch.save(build_network("small_eps", 20).state_dict(), root / "weights" / "voc12_eps.pth")
    # a COCO checkpoint whose dataset folder is there but empty: preflight refuses that row,
    # which says why, and the table is still printed in full
    torch.save(build_network("small_eps", 80).state_dict(), root / "weights" / "coco_eps.pth")
    (root / COCO).mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CHECKPOINT", "DATASET_ROOT", "DATASET",
                                                            "OUT_DIR", "LIST", "NGPUS")}
    env.update(PYTHON=sys.executable, DEVICE="cpu", OMP_NUM_THREADS="1", DOWNLOAD_ROOT=str(root),
               LIST=str(tmp_path / "list.txt"), OUT_DIR=str(tmp_path / "out"),
               INFER_ARGS="--scales 1.0 --num-workers 0 --writer-threads 1")
    proc = subprocess.run(["bash", str(REPO / "script" / "eval_released.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| dataset | network | list | published mIoU | this run |"
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]
    assert [c[:4] for c in cells] == [
        ["voc12", "resnet38_cls", "-", "47.05"], ["voc12", "small_eps", "list", "69.22"],
        ["coco", "resnet38_cls", "-", "31.23"], ["coco", "resnet38_eps", "-", "37.15"]]
    assert re.fullmatch(r"\d+\.\d\d", cells[1][4])
    assert cells[0][4] == "not downloaded: bash script/download.sh released"
    assert cells[3][4].startswith("failed: preflight: "), cells[3][4]
    assert "problem(s), nothing was run: infer: " in cells[3][4] and "Traceback" not in proc.stderr
    assert "1 of the checkpoints above could not be evaluated" in proc.stderr
    assert not (tmp_path / "out" / "released_coco_eps_coco").exists()
    assert (tmp_path / "out" / "released_voc12_eps_voc12" / "miou.txt").is_file()
    # nothing downloaded at all: one line naming the command
    proc = subprocess.run(["bash", str(REPO / "script" / "eval_released.sh")],
                          env={**env, "DOWNLOAD_ROOT": str(tmp_path / "empty")}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bash script/download.sh released" in proc.stderr
