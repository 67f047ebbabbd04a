"""Label tools on small generated inputs: VOC XML, a tiny COCO JSON, a pickled cls_labels.npy."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from data.metadata import read_image_labels
from data.registry import get_dataset
from tools import convert_cls_labels_npy as conv
from tools import make_cls_labels as mcl
from tools import make_coco_masks as mcm

# ------------------------------------------------------------------------------------------ VOC
XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
OBJ = """<object><name>{name}</name><truncated>{trunc}</truncated><difficult>{diff}</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>{parts}</object>"""
PART = "<part><name>{}</name><bndbox><xmin>1</xmin></bndbox></part>"


def _obj(name, trunc=0, diff=0, parts=()):
    return OBJ.format(name=name, trunc=trunc, diff=diff, parts="".join(PART.format(p) for p in parts))


@pytest.fixture
def voc(tmp_path):
    ann = tmp_path / "VOC2012" / "Annotations"
    ann.mkdir(parents=True)
    files = {
        # person with part names (head/hand are not classes) and a difficult dog
        "2007_000001": [_obj("person", parts=("head", "hand", "foot")), _obj("dog", diff=1)],
        "2007_000002": [_obj("bottle", trunc=1)],
        "2007_000003": [_obj("aeroplane"), _obj("aeroplane"), _obj("tvmonitor")],
        "2007_000004": [_obj("head")],  # only a non-class name: an image with no class
    }
    for i, objs in files.items():
        (ann / f"{i}.xml").write_text(XML.format(id=i, objects="".join(objs)))
    (tmp_path / "a.txt").write_text("2007_000001\n2007_000002\n")
    (tmp_path / "b.txt").write_text("2007_000002\n2007_000003\n2007_000004\n")
    return tmp_path


def _run(module, argv):
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def test_voc_labels_exact_text(voc, caplog):
    out = voc / "out" / "image_labels.txt"
    with caplog.at_level(logging.WARNING):
        _run(mcl, ["--dataset", "voc12", "--data-root", voc / "VOC2012", "--out", out,
                   "--lists", voc / "a.txt", voc / "b.txt"])
    lines = out.read_text().splitlines()
    assert lines[0] == "# image_id followed by the 0-based indices of the classes present (0=aeroplane ... 19=tvmonitor)"
    assert lines[1].startswith("# made by tools/make_cls_labels.py from ")
    assert lines[2:] == ["2007_000001 11 14", "2007_000002 4", "2007_000003 0 19", "2007_000004"]
    assert "1 images have no class" in caplog.text
    labels = read_image_labels(out, 20)
    assert np.flatnonzero(labels["2007_000001"]).tolist() == [11, 14]
    with pytest.raises(mcl.LabelToolError, match="--overwrite"):
        _run(mcl, ["--data-root", voc / "VOC2012", "--out", out, "--lists", voc / "a.txt"])
    (voc / "c.txt").write_text("2007_000009\n")
    with pytest.raises(mcl.LabelToolError, match=r"2007_000009\.xml"):
        _run(mcl, ["--data-root", voc / "VOC2012", "--out", voc / "x.txt", "--lists", voc / "c.txt"])


def test_voc_label_vector_ignores_unknown_names(voc):
    vec = mcl.voc_label_vector(voc / "VOC2012" / "Annotations" / "2007_000004.xml",
                               get_dataset("voc12").class_names)
    assert vec.dtype == np.float32 and vec.shape == (20,) and not vec.any()


# ----------------------------------------------------------------------------------------- COCO
COCO_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) +
            list(range(46, 66)) + [67, 70] + list(range(72, 83)) + list(range(84, 91)))


def _rle_counts(mask):
    """Uncompressed COCO RLE (column-major runs, starting with a run of zeros)."""
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return counts


DOG = np.zeros((6, 8), np.uint8)
DOG[2:5, 3:7] = 1
CROWD = np.zeros((5, 5), np.uint8)
CROWD[1:3, :] = 1
PERSON_RECT = [[1, 1, 5, 1, 5, 4, 1, 4]]  # pycocotools fills rows 1..3, cols 1..4


@pytest.fixture
def coco(tmp_path):
    from pycocotools import mask as mu
    names = get_dataset("coco").class_names
    cats = [{"id": cid, "name": n.replace("_", " "), "supercategory": "x"} for cid, n in zip(COCO_IDS, names)]
    dog_rle = mu.encode(np.asfortranarray(DOG))
    train = {
        "images": [{"id": 9, "height": 6, "width": 8, "file_name": "COCO_train2014_000000000009.jpg"},
                   {"id": 25, "height": 5, "width": 5, "file_name": "COCO_train2014_000000000025.jpg"},
                   {"id": 30, "height": 4, "width": 4, "file_name": "COCO_train2014_000000000030.jpg"},
                   {"id": 12, "height": 4, "width": 4, "file_name": "COCO_train2014_000000000012.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 12, "category_id": 13, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
            {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": PERSON_RECT},
            {"id": 3, "image_id": 9, "category_id": 18, "iscrowd": 0,
             "segmentation": {"size": [6, 8], "counts": dog_rle["counts"].decode()}},  # compressed RLE
            {"id": 4, "image_id": 25, "category_id": 90, "iscrowd": 1,
             "segmentation": {"size": [5, 5], "counts": _rle_counts(CROWD)}},        # crowd RLE
        ],
        "categories": cats,
    }
    val = {"images": [{"id": 42, "height": 3, "width": 3, "file_name": "x.jpg"}],
           "annotations": [{"id": 5, "image_id": 42, "category_id": 1, "iscrowd": 0, "segmentation": []}],
           "categories": cats}
    ann = tmp_path / "COCO" / "annotations"
    ann.mkdir(parents=True)
    (ann / "instances_train2014.json").write_text(json.dumps(train))
    (ann / "instances_val2014.json").write_text(json.dumps(val))
    return tmp_path / "COCO"


def test_coco_ranks():
    ranks = mcl.coco_category_ranks([{"id": i} for i in reversed(COCO_IDS)])
    assert ranks[1] == 0 and ranks[13] == 11 and ranks[18] == 16 and ranks[90] == 79 and len(ranks) == 80


def test_coco_labels_and_lists_exact_text(coco, tmp_path, caplog):
    out = tmp_path / "labels.txt"
    with caplog.at_level(logging.WARNING):
        _run(mcl, ["--dataset", "coco", "--data-root", coco, "--out", out, "--list-dir", tmp_path / "lists"])
    assert "differ" not in caplog.text  # JSON names with spaces match labels.txt underscores
    lines = out.read_text().splitlines()
    assert lines[0] == "# image_id followed by the 0-based indices of the classes present (0=person ... 79=toothbrush)"
    assert lines[1] == ("# made by tools/make_cls_labels.py from instances_train2014.json, "
                        "instances_val2014.json (crowd annotations included)")
    assert lines[2:] == ["COCO_train2014_000000000009 0 16", "COCO_train2014_000000000012 11",
                         "COCO_train2014_000000000025 79", "COCO_val2014_000000000042 0"]
    assert (tmp_path / "lists" / "train.txt").read_text() == (
        "COCO_train2014_000000000009\nCOCO_train2014_000000000012\nCOCO_train2014_000000000025\n")
    assert (tmp_path / "lists" / "val.txt").read_text() == "COCO_val2014_000000000042\n"

    out2 = tmp_path / "labels_nocrowd.txt"
    _run(mcl, ["--dataset", "coco", "--data-root", coco, "--out", out2, "--crowd", "exclude",
               "--annotations", coco / "annotations" / "instances_train2014.json"])
    assert out2.read_text().splitlines()[2:] == ["COCO_train2014_000000000009 0 16",
                                                 "COCO_train2014_000000000012 11"]
    with pytest.raises(mcl.LabelToolError, match="--overwrite"):
        _run(mcl, ["--dataset", "coco", "--data-root", coco, "--out", tmp_path / "new.txt",
                   "--list-dir", tmp_path / "lists"])


def _mask(path):
    img = Image.open(path)
    assert img.mode == "P"
    return np.array(img)


def test_coco_masks_values_crowd_and_resume(coco):
    assert _run(mcm, ["--data-root", coco, "--workers", "0"]) == (4, 0)
    seg = coco / "SegmentationClass"
    expected9 = np.zeros((6, 8), np.uint8)
    expected9[1:4, 1:5] = 1          # person polygon -> index 0 + 1
    expected9[DOG > 0] = 17          # dog RLE (index 16 + 1), later annotation overwrites
    assert np.array_equal(_mask(seg / "train2014" / "COCO_train2014_000000000009.png"), expected9)
    assert np.array_equal(_mask(seg / "train2014" / "COCO_train2014_000000000025.png"), CROWD * 80)
    expected12 = np.zeros((4, 4), np.uint8)
    expected12[0:2, 0:2] = 12        # stop sign (id 13, index 11)
    assert np.array_equal(_mask(seg / "train2014" / "COCO_train2014_000000000012.png"), expected12)
    assert not (seg / "train2014" / "COCO_train2014_000000000030.png").exists()  # no annotation
    assert not _mask(seg / "val2014" / "COCO_val2014_000000000042.png").any()     # empty polygon list

    # resume: existing (complete, atomically written) files are kept
    Image.fromarray(np.full((6, 8), 3, np.uint8)).save(seg / "train2014" / "COCO_train2014_000000000009.png")
    assert _run(mcm, ["--data-root", coco, "--workers", "0"]) == (0, 4)
    assert np.array(Image.open(seg / "train2014" / "COCO_train2014_000000000009.png"))[0, 0] == 3
    assert _run(mcm, ["--data-root", coco, "--workers", "2", "--overwrite"]) == (4, 0)
    assert np.array_equal(_mask(seg / "train2014" / "COCO_train2014_000000000009.png"), expected9)
    assert not list(seg.rglob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("mode,value", [("ignore", 255), ("skip", 0)])
def test_coco_masks_crowd_modes(coco, tmp_path, mode, value):
    out = tmp_path / f"m_{mode}"
    _run(mcm, ["--annotations", coco / "annotations" / "instances_train2014.json", "--out-root", out,
               "--crowd", mode, "--workers", "0", "--all-images", "--no-palette"])
    m = np.array(Image.open(out / "train2014" / "COCO_train2014_000000000025.png"))
    assert np.array_equal(m, CROWD * value)
    assert not np.array(Image.open(out / "train2014" / "COCO_train2014_000000000030.png")).any()


def test_coco_masks_id_filter(coco, tmp_path):
    (tmp_path / "ids.txt").write_text("COCO_train2014_000000000012\n")
    out = tmp_path / "m"
    assert _run(mcm, ["--annotations", coco / "annotations" / "instances_train2014.json",
                      "--out-root", out, "--ids", tmp_path / "ids.txt", "--workers", "0"]) == (1, 0)
    assert [p.name for p in (out / "train2014").iterdir()] == ["COCO_train2014_000000000012.png"]


# ------------------------------------------------------------------------------ npy converter
def test_convert_npy_exact_text(tmp_path, caplog):
    a = np.zeros(20, np.float32)
    a[[0, 14]] = 1
    b = np.zeros(20, np.float32)
    b[19] = 1
    np.save(tmp_path / "cls_labels.npy", {"2007_000032": a, 2007000033: b})  # pickled dict (IRN int key)
    out = tmp_path / "image_labels.txt"
    with caplog.at_level(logging.WARNING):
        labels = _run(conv, ["--npy", tmp_path / "cls_labels.npy", "--out", out])
    assert "unpickling" in caplog.text
    assert out.read_text().splitlines() == [
        "# image_id followed by the 0-based indices of the classes present (0=aeroplane ... 19=tvmonitor)",
        "# converted by tools/convert_cls_labels_npy.py from cls_labels.npy",
        "2007_000032 0 14",
        "2007_000033 19"]
    assert list(labels) == ["2007_000032", "2007_000033"]
    with pytest.raises(conv.ConvertError, match="--overwrite"):
        _run(conv, ["--npy", tmp_path / "cls_labels.npy", "--out", out])
    with pytest.raises(conv.ConvertError, match="80"):
        _run(conv, ["--npy", tmp_path / "cls_labels.npy", "--out", tmp_path / "c.txt", "--dataset", "coco"])
    np.save(tmp_path / "list.npy", np.arange(3))
    with pytest.raises(conv.ConvertError, match="expected np.save of a dict"):
        _run(conv, ["--npy", tmp_path / "list.npy", "--out", tmp_path / "d.txt"])


# ------------------------------------------------------------------------------------------------
# a spreadsheet of image labels (docs/custom-data.md)
# ------------------------------------------------------------------------------------------------
def _csv_run(tmp_path, text, *extra, labels_txt=None):
    root = tmp_path / "mine"
    root.mkdir(exist_ok=True)
    if labels_txt is not None:
        (root / "labels.txt").write_text(labels_txt)
    (tmp_path / "labels.csv").write_text(text)
    args = mcl.get_args_parser().parse_args(
        ["--dataset", "custom", "--data-root", str(root), "--csv", str(tmp_path / "labels.csv"),
         "--out", str(root / "image_labels.txt"), *map(str, extra)])
    return mcl.main(args), root


def test_csv_one_column_of_names_writes_labels_lists_and_class_names(tmp_path):
    text = ("image,labels,split\n"
            "photos/a.jpg,cat;dog,train\n"
            "b.JPG,dog,val\n"
            "\n"
            "c.jpeg,cat | bird,train\n")
    labels, root = _csv_run(tmp_path, text, "--list-dir", tmp_path / "mine")
    assert (root / "labels.txt").read_text() == "0 background\n1 bird\n2 cat\n3 dog\n"
    lines = [x for x in (root / "image_labels.txt").read_text().splitlines() if not x.startswith("#")]
    assert lines == ["a 1 2", "b 2", "c 0 1"]
    assert (root / "train.txt").read_text() == "a\nc\n" and (root / "val.txt").read_text() == "b\n"
    # the dataset reads them as they are
    from data.registry import get_dataset
    info = get_dataset("custom", None, root)
    assert info.class_names == ["bird", "cat", "dog"] and info.labels_for("c").tolist() == [1, 1, 0]


def test_csv_images_without_a_class_leave_the_training_lists(tmp_path, caplog):
    """They stay in image_labels.txt (no indices) and in evaluation lists; the training lists
    lose them to no_class.txt (for infer.py --labels predicted)."""
    text = ("image,cat,dog,split\n"
            "a.jpg,1,0,train\nb.jpg,0,0,train\nc.jpg,0,1,train\nd.jpg,0,0,val\ne.jpg,,,train\n")
    labels, root = _csv_run(tmp_path, text, "--list-dir", tmp_path / "mine")
    lines = [x for x in (root / "image_labels.txt").read_text().splitlines() if not x.startswith("#")]
    assert lines == ["a 0", "b", "c 1", "d", "e"]
    assert (root / "train.txt").read_text() == "a\nc\n"
    assert (root / "val.txt").read_text() == "d\n"
    assert (root / "no_class.txt").read_text() == "b\ne\n"
    assert ("3 images have no class (e.g. ['b', 'd', 'e']); they are written without indices; 2 of "
            f"them left the training lists for {root / 'no_class.txt'}") in caplog.text
    # the training list is usable as it is: every id has a class
    from data.registry import get_dataset
    info = get_dataset("custom", None, root)
    assert all(info.labels_for(i).any() for i in info.read_ids("train"))
    # without a split column every image is a training one
    (tmp_path / "two").mkdir()
    labels, root = _csv_run(tmp_path / "two", "image,labels\na.jpg,cat\nb.jpg,\n", "--list-dir",
                            tmp_path / "two" / "mine", labels_txt="0 background\n1 cat\n")
    assert (root / "train.txt").read_text() == "a\n" and (root / "no_class.txt").read_text() == "b\n"
    # a split of that name would be overwritten: refused
    with pytest.raises(mcl.LabelToolError, match="a split is named 'no_class'"):
        _csv_run(tmp_path / "two", "image,labels,split\na.jpg,cat,no_class\n", "--overwrite",
                 labels_txt="0 background\n1 cat\n")


def test_csv_one_column_per_class_with_an_existing_class_list(tmp_path):
    text = "file,dog,cat\nx.jpg,1,0\ny.jpg,yes,1\nz.jpg,0,\n"
    labels, root = _csv_run(tmp_path, text, labels_txt="0 background\n1 cat\n2 dog\n")
    lines = [x for x in (root / "image_labels.txt").read_text().splitlines() if not x.startswith("#")]
    assert lines == ["x 1", "y 0 1", "z"]   # indices follow labels.txt, not the column order
    assert (root / "labels.txt").read_text() == "0 background\n1 cat\n2 dog\n"  # untouched


def test_csv_a_single_class_column_of_0_and_1_is_that_class(tmp_path):
    """Not two classes named "0" and "1" (the negatives labelled as class "0")."""
    labels, root = _csv_run(tmp_path, "image,cat\na.jpg,1\nb.jpg,0\nc.jpg,\n")
    assert (root / "labels.txt").read_text() == "0 background\n1 cat\n"
    lines = [x for x in (root / "image_labels.txt").read_text().splitlines() if not x.startswith("#")]
    assert lines == ["a 0", "b", "c"]


@pytest.mark.parametrize("text, expect", [
    ("image,labels\na.jpg,cat\na.jpg,dog\n", r"image 'a' is on rows 2 and 3"),
    ("image,cat,dog\na.jpg,1,maybe\n", r"labels.csv:2: column 'dog' holds 'maybe'"),
    ("image,labels\na.jpg,cow\n", r"labels.csv:2: class 'cow' is not in the class list"),
    ("image\na.jpg\n", r"no label column besides the id"),
])
def test_csv_bad_rows_are_one_line_errors(tmp_path, text, expect):
    with pytest.raises(mcl.LabelToolError, match=expect):
        _csv_run(tmp_path, text, labels_txt="0 background\n1 cat\n2 dog\n")
    assert not (tmp_path / "mine" / "image_labels.txt").exists()
