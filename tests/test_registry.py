"""Dataset registry and plain-text metadata: the published lists load, custom roots work."""
import numpy as np
import pytest

from data.metadata import (MetadataError, read_class_names, read_id_list, read_image_labels,
                           write_class_names, write_id_list, write_image_labels)
from data.registry import DATASETS, get_dataset


def test_voc12_metadata_counts():
    info = get_dataset("voc12")
    assert info.num_classes == 20 and info.class_names[0] == "aeroplane"
    assert info.class_names[-1] == "tvmonitor"
    assert len(info.read_ids("train")) == 1464
    assert len(info.read_ids("metadata/voc12/train_aug.txt")) == 10582  # the published path style
    assert len(info.read_ids("val")) == 1449
    labels = info.image_labels
    assert len(labels) == 12031
    # Label-count histogram of the published cls_labels.npy (EPS metadata/voc12/; psa's is the same).
    hist = np.bincount([int(v.sum()) for v in labels.values()])
    assert hist[1:7].tolist() == [7176, 3479, 1090, 233, 49, 4]
    np.testing.assert_array_equal(np.flatnonzero(info.labels_for("2007_000032")), [0, 14])


def test_coco_metadata_counts():
    info = get_dataset("coco")
    assert info.num_classes == 80
    assert info.class_names[0] == "person" and info.class_names[-1] == "toothbrush"
    assert len(info.read_ids("train")) == 82081
    assert len(info.read_ids("val")) == 40137


def test_paths_accept_root_or_image_folder(tmp_path):
    info = get_dataset("voc12")
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "JPEGImages" / "a.jpg").write_bytes(b"x")
    (root / "SegmentationClassAug" / "a.png").write_bytes(b"x")
    for r in (root, root / "JPEGImages"):
        assert info.image_path(r, "a") == root / "JPEGImages" / "a.jpg"
        assert info.gt_path(r, "a") == root / "SegmentationClassAug" / "a.png"
    # A missing file resolves to its canonical place, for error messages.
    assert info.image_path(root, "b") == root / "JPEGImages" / "b.jpg"


def test_coco_split_folders(tmp_path):
    info = get_dataset("coco")
    assert info.image_path(tmp_path, "COCO_val2014_000000000042") == \
        tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert info.gt_path(tmp_path, "COCO_train2014_000000000009") == \
        tmp_path / "SegmentationClass" / "train2014" / "COCO_train2014_000000000009.png"


def test_custom_root_round_trip(tmp_path):
    write_class_names(tmp_path / "labels.txt", ["background", "train", "boat"])
    write_id_list(tmp_path / "train.txt", ["x1", "x2"])
    write_image_labels(tmp_path / "image_labels.txt",
                       {"x1": [1, 0], "x2": [1, 1]}, header="demo")
    info = get_dataset("custom", data_root=tmp_path / "JPEGImages")
    assert info.metadata_dir == tmp_path
    assert info.class_names == ["train", "boat"]
    assert info.read_ids("train") == ["x1", "x2"]
    np.testing.assert_array_equal(info.labels_for("x2"), [1, 1])
    with pytest.raises(MetadataError, match="no image labels for id 'x3'"):
        info.labels_for("x3")
    with pytest.raises(ValueError, match="metadata-dir"):
        get_dataset("custom")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("pascal")


def test_malformed_metadata_names_the_file(tmp_path):
    p = tmp_path / "image_labels.txt"
    p.write_text("a 0 25\n")
    with pytest.raises(MetadataError, match=r"image_labels.txt:1: class index 25"):
        read_image_labels(p, 20)
    p.write_text("a 0 x\n")
    with pytest.raises(MetadataError, match="integers"):
        read_image_labels(p, 20)
    q = tmp_path / "labels.txt"
    q.write_text("0 background\n2 cat\n")
    with pytest.raises(MetadataError, match="without gaps"):
        read_class_names(q)
    e = tmp_path / "empty.txt"
    e.write_text("# nothing\n")
    with pytest.raises(MetadataError, match="empty"):
        read_id_list(e)
    with pytest.raises(MetadataError, match="not found"):
        read_id_list(tmp_path / "missing.txt")
    # PSA-style list lines are reduced to the id.
    psa = tmp_path / "psa.txt"
    psa.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    assert read_id_list(psa) == ["2007_000032"]


def test_empty_label_is_an_error(tmp_path):
    write_class_names(tmp_path / "labels.txt", ["background", "a"])
    (tmp_path / "image_labels.txt").write_text("x\n")
    info = get_dataset("custom", metadata_dir=tmp_path)
    with pytest.raises(MetadataError, match="has no class"):
        info.labels_for("x")


def test_every_registry_entry_has_training_defaults():
    for name, spec in DATASETS.items():
        assert {"crop_size", "batch_size", "max_iters", "lr", "wt_dec"} <= set(spec.train_defaults)
        # a method's own values are the head's (network/heads.py), not the dataset's
        assert not {"tau", "lam"} & set(spec.train_defaults)


def test_the_eps_head_declares_its_published_recipe():
    """EPS script/voc12_eps.sh and coco_eps.sh (docs/reference.md 1.3): tau 0.4 everywhere, lam
    0.5 on VOC (main.py's default; the script passes none) and 0.9 on COCO; a custom dataset
    gets the VOC values."""
    from network.heads import EpsHead
    hp = EpsHead.hparams
    assert {d: (hp["tau"].default_for(d), hp["lam"].default_for(d)) for d in DATASETS} == {
        "voc12": (0.4, 0.5), "coco": (0.4, 0.9), "custom": (0.4, 0.5)}


def test_duplicate_ids_are_dropped_with_a_warning(tmp_path, caplog):
    p = tmp_path / "train.txt"
    p.write_text("b\na\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\nc\na\na\n")
    with caplog.at_level("WARNING", logger="data.metadata"):
        assert read_id_list(p) == ["b", "a", "c"]  # first occurrences, in file order
    (rec,) = caplog.records
    assert rec.levelname == "WARNING"
    msg = rec.getMessage()
    assert str(p) in msg and "3 duplicate id line(s) dropped" in msg and "repeated ids: b, a" in msg
    assert read_id_list(p, keep_duplicates=True) == ["b", "a", "b", "c", "a", "a"]
    caplog.clear()
    p.write_text("x\ny\n")
    with caplog.at_level("WARNING", logger="data.metadata"):
        assert read_id_list(p) == ["x", "y"]
    assert not caplog.records


def test_registry_lists_never_repeat_an_id(tmp_path):
    write_class_names(tmp_path / "labels.txt", ["background", "a"])
    (tmp_path / "train.txt").write_text("x1\nx2\nx1\n")
    info = get_dataset("custom", metadata_dir=tmp_path)
    assert info.read_ids("train") == ["x1", "x2"]
    assert info.read_ids("train", keep_duplicates=True) == ["x1", "x2", "x1"]


def test_image_labels_id_on_two_lines(tmp_path, caplog):
    p = tmp_path / "image_labels.txt"
    p.write_text("# header\na 0 3\nb 1\na 2\n")
    with pytest.raises(MetadataError) as e:
        read_image_labels(p, 20)
    msg = str(e.value)
    assert str(p) in msg and "'a'" in msg and "line 2 and line 4" in msg and "[0 3] vs [2]" in msg
    assert "\n" not in msg
    # The same classes again (in another order): kept once, with one warning.
    p.write_text("a 0 3\nb 1\na 3 0\nb 1\n")
    with caplog.at_level("WARNING", logger="data.metadata"):
        labels = read_image_labels(p, 20)
    assert list(labels) == ["a", "b"]
    np.testing.assert_array_equal(np.flatnonzero(labels["a"]), [0, 3])
    (rec,) = caplog.records
    assert "2 id(s) repeated" in rec.getMessage() and "a, b" in rec.getMessage()


def test_list_encoding(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfx1\nx2\n")  # saved by an editor that adds a byte-order mark
    assert read_id_list(bom) == ["x1", "x2"]
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"x1\r\nx2\rx3\n")  # Windows and old Mac line ends
    assert read_id_list(crlf) == ["x1", "x2", "x3"]
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("x1\nx2\n", encoding="utf-16")
    with pytest.raises(MetadataError, match=r"utf16.txt:1: not UTF-8 text"):
        read_id_list(utf16)
    latin = tmp_path / "image_labels.txt"
    latin.write_bytes(b"a 0\nb\xe9 1\n")
    with pytest.raises(MetadataError, match=r"image_labels.txt:2: not UTF-8 text"):
        read_image_labels(latin, 20)
