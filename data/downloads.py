"""Every input of the pipelines and where it comes from, in one table: ``ROWS`` (one row per
downloaded file, or per file made here) and ``ITEMS`` (what ``bash script/download.sh <item>``
fetches). ``tools/download.py`` downloads, verifies and lays out the rows; the error messages of
the entry points and ``tools/preflight.py`` name the command through :func:`hint`.

Every fact below is cited to the public file that publishes it. Nothing is made up: where no
checksum is published, the row has none and ``tools/download.py`` records the sha256 of what it
downloaded in a lock file beside the data ("recorded at first download"); where no size is
published, ``estimate`` is a labelled estimate for the free-disk check only.

Sources read for this table (the commit read is the one the search index held):
  EPS    halbielee/EPS README.md (Google Drive ids of the saliency maps, COCO masks, ResNet-38 and
         the four released checkpoints; links to VOC, COCO, PSA, deeplab-pytorch, OAA)
  PSA    jiwoon-ahn/psa README.md (ResNet-38 = ilsvrc-cls_rna-a1_cls1000_ep-0001.params, from
         itijyou/ademxapp)
  ADE    itijyou/ademxapp README.md (Model A1 download link) and models/checksum.md5 (its md5)
  DLP    kazuto1011/deeplab-pytorch scripts/setup_voc12.sh, scripts/setup_caffemodels.sh,
         data/datasets/voc12/README.md (SegmentationClassAug: DrSleep's pre-converted files),
         README.md (the caffemodels are "1GB+"; init.caffemodel -> deeplabv1_resnet101-coco.pth)
  OAA    PengtaoJiang/OAA-PyTorch README.md and deeplab-pytorch/scripts/setup_caffemodels.sh (the
         usual stand-in for the paper's init, OAA's, whose training set the authors only assume
         was COCO: EPS issue #4)
  DRS    DrSleep/tensorflow-deeplab-resnet README.md (the SegmentationClassAug.zip Dropbox link)
  VAINF  VainF/DeepLabV3Plus-Pytorch README.md (the same file on Tencent Weiyun)
  TV     pytorch/vision torchvision/datasets/voc.py (VOC 2012 tar URL and md5)
  TFDS   tensorflow/datasets url_checksums/voc.txt, coco2014.txt (sizes and sha256)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

GDRIVE_VIEW = "https://drive.google.com/file/d/{}/view"
HINT_SUFFIX = "(README 'Downloads')"


@dataclass(frozen=True)
class Source:
    """One place a file can be fetched from: ``http`` (a URL) or ``gdrive`` (a Drive file id,
    fetched through gdown)."""
    kind: str
    where: str
    cite: str

    @property
    def url(self) -> str:
        return GDRIVE_VIEW.format(self.where) if self.kind == "gdrive" else self.where


@dataclass(frozen=True)
class Place:
    """Move ``src`` (a path inside the extracted archive; ``@<list><suffix>``: the folder that
    holds the first id of that metadata list, e.g. ``@voc12/train_aug.png``, for archives whose
    inner layout is not published; ``.``: the downloaded file itself) to ``dest`` (relative to
    --root)."""
    src: str
    dest: str


@dataclass(frozen=True)
class Check:
    """One rule the laid-out data must pass (paths relative to --root; ``repo:`` prefix: relative
    to the repository). A folder check counts ``*<suffix>`` files (``count``: exactly that many)
    and/or requires ``<id><suffix>`` for every id of ``ids`` (a metadata list such as
    ``voc12/train_aug``, or the ids themselves). A file check requires the file, and ``load``
    names how it is opened: ``network:<name>:<classes>`` (a classifier checkpoint that
    network.weights identifies as that network), ``deeplab_init:<arch>`` (the DeepLab init keys),
    ``imagenet_trunk`` (a converted ResNet-38 .pth), ``labels:<dataset>:<list>,...`` (an
    image_labels.txt with a line for every id of the lists, or of ``ids``)."""
    path: str
    suffix: str = ""
    count: Optional[int] = None
    ids: Union[str, Tuple[str, ...], None] = None
    load: str = ""
    cite: str = ""

    @property
    def is_folder(self) -> bool:
        return not self.load and bool(self.suffix or self.count is not None or self.ids is not None)


@dataclass(frozen=True)
class Row:
    key: str
    group: str                      # the hint() key of the input this row provides
    what: str
    file: Optional[str]             # download's file name (its name on a --mirror); None: made here
    sources: Tuple[Source, ...] = ()
    size: Optional[int] = None      # bytes, as published (None: not published)
    size_cite: str = ""
    estimate: int = 0               # bytes, for the free-disk check when size is None
    checksums: Tuple[Tuple[str, str], ...] = ()  # (algorithm, hex) as published
    checksum_cite: str = ""
    archive: str = "file"           # tar | zip | auto (sniffed) | file | none (made here)
    members: Tuple[str, ...] = ()   # extract only archive members whose base name is listed
    place: Tuple[Place, ...] = ()
    checks: Tuple[Check, ...] = ()
    post: Tuple[Tuple[str, ...], ...] = ()  # (step, args...) of tools/download.py POST_STEPS
    unpacked: int = 0               # extra bytes once extracted / converted (free-disk check)
    manual: str = ""                # what to do by hand when every source fails
    used_by: Tuple[str, ...] = ()   # the scripts that read it (script/<name>)

    @property
    def need_bytes(self) -> int:
        return (self.size if self.size is not None else self.estimate) + self.unpacked


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
VOC = "datasets/VOCdevkit/VOC2012"
COCO = "datasets/coco"
WEIGHTS = "weights"
_VOC_TAR = "VOCtrainval_11-May-2012.tar"
_DLP_SETUP = "deeplab-pytorch scripts/setup_caffemodels.sh (also in OAA-PyTorch)"
_EPS = "EPS README"
_NOT_PUBLISHED = "not published"


def _gdrive_manual(file_id: str, dest: str, name: str) -> str:
    # The name the next run looks for (tools/download.py fetch_file), not the one the browser
    # saves: a file under another name would not be found.
    return (f"open {GDRIVE_VIEW.format(file_id)} in a browser (Google Drive refuses scripted "
            f"downloads for a while after a quota is reached), save the file as "
            f"<root>/{dest.split('/')[0]}/.downloads/{name} and rerun")


def _released(key: str, file_id: str, network: str, classes: int, what: str) -> "Row":
    dest = f"{WEIGHTS}/{key}.pth"
    return Row(
        key=f"released_{key}", group="released", what=what, file=f"{key}.pth",
        sources=(Source("gdrive", file_id, f"{_EPS}, checkpoint table"),),
        size_cite=_NOT_PUBLISHED, estimate=422_000_000,  # ResNet-38 with fc8: 105 M float32 values
        archive="file", place=(Place(".", dest),),
        checks=(Check(dest, load=f"network:{network}:{classes}",
                      cite="network/weights.py identify_checkpoint"),),
        manual=_gdrive_manual(file_id, dest, f"{key}.pth"), used_by=("eval_released.sh",))


ROWS: Dict[str, Row] = {r.key: r for r in (
    Row(key="voc12_images", group="voc12_images",
        what="PASCAL VOC 2012 trainval: JPEGImages, Annotations, SegmentationClass, ImageSets",
        file=_VOC_TAR,
        sources=(Source("http", f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{_VOC_TAR}",
                        f"{_EPS} (VOC 2012 page); deeplab-pytorch scripts/setup_voc12.sh"),
                 Source("http", f"https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/{_VOC_TAR}",
                        "torchvision datasets/voc.py"),
                 Source("http", f"http://pjreddie.com/media/files/{_VOC_TAR}",
                        "tensorflow/datasets url_checksums/voc.txt")),
        size=1_999_639_040, size_cite="tensorflow/datasets url_checksums/voc.txt",
        checksums=(("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
                   ("sha256", "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb")),
        checksum_cite="md5: torchvision datasets/voc.py; sha256: tensorflow/datasets "
                      "url_checksums/voc.txt",
        archive="tar",
        place=tuple(Place(f"VOCdevkit/VOC2012/{d}", f"{VOC}/{d}") for d in
                    ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject",
                     "ImageSets")),
        checks=(Check(f"{VOC}/JPEGImages", ".jpg", count=17_125, ids="voc12/train_aug",
                      cite="docs/data.md: 17,125 images; every train_aug id"),
                Check(f"{VOC}/JPEGImages", ".jpg", ids="voc12/val"),
                Check(f"{VOC}/SegmentationClass", ".png", count=2_913,
                      cite="1,464 train + 1,449 val (metadata/voc12)")),
        unpacked=1_999_639_040,
        manual="download VOCtrainval_11-May-2012.tar from host.robots.ox.ac.uk/pascal/VOC/voc2012 "
               "and put it in <root>/datasets/.downloads/",
        used_by=("voc12_cls.sh", "voc12_eps.sh", "eval_released.sh")),
    Row(key="voc12_masks", group="voc12_masks",
        what="SegmentationClassAug: VOC masks augmented with SBD (pseudo-mask GT on train, "
             "DeepLab GT on val)",
        file="SegmentationClassAug.zip",
        # ?dl=1 is the same Dropbox link served as the file (dl=0: its web page)
        sources=(Source("http", "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
                        "DrSleep/tensorflow-deeplab-resnet README, via deeplab-pytorch "
                        "data/datasets/voc12/README.md"),),
        size_cite=_NOT_PUBLISHED, estimate=60_000_000,
        archive="zip", place=(Place("SegmentationClassAug", f"{VOC}/SegmentationClassAug"),),
        checks=(Check(f"{VOC}/SegmentationClassAug", ".png", count=12_031, ids="voc12/train_aug",
                      cite="docs/data.md: 12,031 masks = train_aug + val"),
                Check(f"{VOC}/SegmentationClassAug", ".png", ids="voc12/val")),
        unpacked=60_000_000,
        manual="get SegmentationClassAug.zip through a browser from the Dropbox link or its "
               "Tencent Weiyun copy (https://share.weiyun.com/5NmJ6Rk, VainF/DeepLabV3Plus-Pytorch "
               "README), or convert SBD yourself (deeplab-pytorch data/datasets/voc12/README.md); "
               "put it in <root>/datasets/.downloads/",
        used_by=("voc12_cls.sh", "voc12_eps.sh", "eval_released.sh")),
    Row(key="voc12_saliency", group="voc12_saliency",
        what="PFAN saliency maps of VOC (<id>.png)", file="EPS_saliency_voc12",
        sources=(Source("gdrive", "19AjSmgdMlIZH4FXVZ5zjlUZcoZZCkwrI", f"{_EPS}, PASCAL VOC 2012 "
                        "'Saliency maps'"),),
        size_cite=_NOT_PUBLISHED, estimate=300_000_000,
        archive="auto", place=(Place("@voc12/train_aug.png", f"{VOC}/SALImages"),),
        checks=(Check(f"{VOC}/SALImages", ".png", ids="voc12/train_aug",
                      cite="one map per train_aug id (train.py reads them all)"),),
        unpacked=300_000_000,
        manual=_gdrive_manual("19AjSmgdMlIZH4FXVZ5zjlUZcoZZCkwrI", VOC, "EPS_saliency_voc12"),
        used_by=("voc12_eps.sh",)),
    Row(key="coco_train2014", group="coco_images", what="COCO 2014 train images",
        file="train2014.zip",
        sources=(Source("http", "http://images.cocodataset.org/zips/train2014.zip",
                        f"{_EPS} (cocodataset.org); tensorflow/datasets url_checksums/coco2014.txt"),),
        size=13_510_573_713, size_cite="tensorflow/datasets url_checksums/coco2014.txt",
        checksums=(("sha256", "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),),
        checksum_cite="tensorflow/datasets url_checksums/coco2014.txt",
        archive="zip", place=(Place("train2014", f"{COCO}/train2014"),),
        checks=(Check(f"{COCO}/train2014", ".jpg", count=82_783, ids="coco/train",
                      cite="COCO 2014 train: 82,783 images (docs reference 1.4)"),),
        unpacked=13_510_573_713,
        manual="download train2014.zip from cocodataset.org and put it in <root>/datasets/.downloads/",
        used_by=("coco_cls.sh", "coco_eps.sh", "eval_released.sh")),
    Row(key="coco_val2014", group="coco_images", what="COCO 2014 val images", file="val2014.zip",
        sources=(Source("http", "http://images.cocodataset.org/zips/val2014.zip",
                        f"{_EPS} (cocodataset.org); tensorflow/datasets url_checksums/coco2014.txt"),),
        size=6_645_013_297, size_cite="tensorflow/datasets url_checksums/coco2014.txt",
        checksums=(("sha256", "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"),),
        checksum_cite="tensorflow/datasets url_checksums/coco2014.txt",
        archive="zip", place=(Place("val2014", f"{COCO}/val2014"),),
        checks=(Check(f"{COCO}/val2014", ".jpg", count=40_504, ids="coco/val",
                      cite="COCO 2014 val: 40,504 images (docs reference 1.4)"),),
        unpacked=6_645_013_297,
        manual="download val2014.zip from cocodataset.org and put it in <root>/datasets/.downloads/",
        used_by=("coco_eps.sh",)),
    Row(key="coco_annotations", group="coco_images",
        what="COCO 2014 instance annotations (for the labels and the mask tool)",
        file="annotations_trainval2014.zip",
        sources=(Source("http", "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                        "tensorflow/datasets url_checksums/coco2014.txt (cocodataset.org)"),),
        size=252_872_794, size_cite="tensorflow/datasets url_checksums/coco2014.txt",
        checksums=(("sha256", "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),),
        checksum_cite="tensorflow/datasets url_checksums/coco2014.txt",
        archive="zip", place=(Place("annotations", f"{COCO}/annotations"),),
        checks=(Check(f"{COCO}/annotations/instances_train2014.json"),
                Check(f"{COCO}/annotations/instances_val2014.json")),
        unpacked=800_000_000,
        manual="download annotations_trainval2014.zip from cocodataset.org and put it in "
               "<root>/datasets/.downloads/",
        used_by=("coco_cls.sh", "coco_eps.sh")),
    Row(key="coco_masks", group="coco_masks",
        what="COCO 2014 semantic masks of EPS (0 = background, 1..80)", file="EPS_coco_masks",
        sources=(Source("gdrive", "16wuPinx0rdIP_PO0uYeCn9rfX2-evc-S",
                        f"{_EPS}, MS-COCO 2014 'Segmentation masks'"),),
        size_cite=_NOT_PUBLISHED, estimate=1_000_000_000,
        archive="auto",
        place=(Place("@coco/train.png", f"{COCO}/SegmentationClass/train2014"),
               Place("@coco/val.png", f"{COCO}/SegmentationClass/val2014")),
        checks=(Check(f"{COCO}/SegmentationClass/train2014", ".png", ids="coco/train"),
                Check(f"{COCO}/SegmentationClass/val2014", ".png", ids="coco/val")),
        unpacked=1_000_000_000,
        manual=_gdrive_manual("16wuPinx0rdIP_PO0uYeCn9rfX2-evc-S", COCO, "EPS_coco_masks")
        + "; or make them from the annotations: bash script/download.sh coco --coco-masks make "
          "(python tools/make_coco_masks.py --data-root <root>/datasets/coco)",
        used_by=("coco_cls.sh", "coco_eps.sh", "eval_released.sh")),
    Row(key="coco_saliency", group="coco_saliency", what="PFAN saliency maps of COCO train2014",
        file="EPS_saliency_coco",
        sources=(Source("gdrive", "1o50oztQqTc_xZdgpIEvgKD2Xi_HqBFig",
                        f"{_EPS}, MS-COCO 2014 'Saliency maps'"),),
        size_cite=_NOT_PUBLISHED, estimate=2_000_000_000,
        archive="auto", place=(Place("@coco/train.png", f"{COCO}/SALImages"),),
        checks=(Check(f"{COCO}/SALImages", ".png", ids="coco/train"),),
        unpacked=2_000_000_000,
        manual=_gdrive_manual("1o50oztQqTc_xZdgpIEvgKD2Xi_HqBFig", COCO,
                              "EPS_saliency_coco"), used_by=("coco_eps.sh",)),
    Row(key="coco_labels", group="coco_labels",
        what="COCO image labels (not shipped: made from the annotations by tools/make_cls_labels.py)",
        file=None, archive="none", post=(("coco_labels", COCO, "repo:metadata/coco/image_labels.txt"),),
        checks=(Check("repo:metadata/coco/image_labels.txt", load="labels:coco:train,val"),),
        manual="python tools/make_cls_labels.py --dataset coco --data-root <root>/datasets/coco "
               "--out metadata/coco/image_labels.txt",
        used_by=("coco_cls.sh", "coco_eps.sh", "eval_released.sh")),
    Row(key="imagenet_resnet38", group="imagenet_resnet38",
        what="ImageNet ResNet-38 (ademxapp Model A1, MXNet), the classifier's initialisation; "
             "also converted to resnet38d_imagenet.pth by tools/convert_resnet38.py",
        file="ilsvrc-cls_rna-a1_cls1000_ep-0001.params",
        sources=(Source("gdrive", "15F13LEL5aO45JU-j45PYjzv5KW5bn_Pn",
                        f"{_EPS}, 'ImageNet-pretrained Model for ResNet38'"),
                 Source("http", "https://cloudstor.aarnet.edu.au/plus/index.php/s/NOPhJ247fhVDnZH/download",
                        "itijyou/ademxapp README, Model A1 'aar' link (PSA README points there)")),
        size_cite=_NOT_PUBLISHED, estimate=440_000_000,  # 110 M float32 values (trunk + linear1000)
        checksums=(("md5", "ff21f45d6bf03284100dcbec571edfad"),),
        checksum_cite="itijyou/ademxapp models/checksum.md5",
        archive="file", place=(Place(".", f"{WEIGHTS}/ilsvrc-cls_rna-a1_cls1000_ep-0001.params"),),
        checks=(Check(f"{WEIGHTS}/ilsvrc-cls_rna-a1_cls1000_ep-0001.params", load="checksum"),
                Check(f"{WEIGHTS}/resnet38d_imagenet.pth", load="imagenet_trunk",
                      cite="tools/convert_resnet38.py")),
        post=(("convert_resnet38", f"{WEIGHTS}/resnet38d_imagenet.pth"),), unpacked=421_000_000,
        manual=_gdrive_manual("15F13LEL5aO45JU-j45PYjzv5KW5bn_Pn", WEIGHTS,
                              "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"),
        used_by=("voc12_cls.sh", "voc12_eps.sh", "coco_cls.sh", "coco_eps.sh")),
    Row(key="deeplab_init", group="deeplab_init",
        what="DeepLab-v2 ResNet-101 COCO init (the usual stand-in for the paper's OAA init, "
             "COCO assumed by the authors, EPS issue #4): "
             "init.caffemodel from DeepLab's prototxt_and_model.zip, converted without Caffe "
             "(network/caffemodel.py) to deeplabv1_resnet101-coco.pth",
        file="prototxt_and_model.zip",
        sources=(Source("http", "http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/"
                                "prototxt_and_model.zip", _DLP_SETUP),),
        size_cite="not published (deeplab-pytorch README: the caffemodels are '1GB+')",
        estimate=1_100_000_000,
        archive="zip", members=("init.caffemodel",),
        place=(Place("init.caffemodel", f"{WEIGHTS}/init.caffemodel"),),
        checks=(Check(f"{WEIGHTS}/deeplabv1_resnet101-coco.pth", load="deeplab_init:deeplabv2_resnet101",
                      cite="network/caffemodel.py reference_init_shapes"),),
        post=(("caffemodel_to_pth", f"{WEIGHTS}/deeplabv1_resnet101-coco.pth", "deeplabv2_resnet101",
               "91"),), unpacked=350_000_000,
        manual="download prototxt_and_model.zip from DeepLab's page "
               "(http://liangchiehchen.com/projects/DeepLabv2_resnet.html) by hand and put it in "
               "<root>/weights/.downloads/",
        used_by=("voc12_eps.sh", "coco_eps.sh")),
    _released("voc12_cls", "1dO4ZKerN6MMFLjaDw0TV_h7ZUOxRQvdq", "resnet38_cls", 20,
              "released EPS checkpoint: VOC 2012 baseline CAM (train mIoU 47.05)"),
    _released("voc12_eps", "1f3iVGRt2nH8BMxEP-w6VoJANouoHNLYM", "resnet38_eps", 20,
              "released EPS checkpoint: VOC 2012 EPS (train mIoU 69.22)"),
    _released("coco_cls", "1VPi5GbTarzix_dwHBWC__1_WWrEZ6fzw", "resnet38_cls", 80,
              "released EPS checkpoint: COCO 2014 baseline CAM (train mIoU 31.23)"),
    _released("coco_eps", "1D9dDj2_oR_aLUWpex2HL3o80zbGpk7Vp", "resnet38_eps", 80,
              "released EPS checkpoint: COCO 2014 EPS (train mIoU 37.15)"),
)}

# What `bash script/download.sh <item>` fetches, in order. voc12 and coco include the two weight
# files their scripts need, so that `download.sh voc12` then `voc12_eps.sh` is the whole path.
ITEMS: Dict[str, Tuple[str, ...]] = {
    "voc12": ("voc12_images", "voc12_masks", "voc12_saliency", "imagenet_resnet38", "deeplab_init"),
    "coco": ("coco_train2014", "coco_val2014", "coco_annotations", "coco_masks", "coco_saliency",
             "coco_labels", "imagenet_resnet38", "deeplab_init"),
    "weights": ("imagenet_resnet38", "deeplab_init"),
    "released": ("released_voc12_cls", "released_voc12_eps", "released_coco_cls",
                 "released_coco_eps"),
}

# Released checkpoint -> (dataset, where script/eval_released.sh finds its data under --root).
RELEASED = {"released_voc12_cls": ("voc12", VOC), "released_voc12_eps": ("voc12", VOC),
            "released_coco_cls": ("coco", COCO), "released_coco_eps": ("coco", COCO)}

# hint() keys: the inputs the entry points and preflight name, with the item that fetches each.
_HINTS = {
    "voc12_images": ("PASCAL VOC 2012 images: VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk); the "
                     "root is its VOCdevkit/VOC2012 folder", "voc12"),
    "voc12_masks": ("SegmentationClassAug, the SBD-augmented VOC masks, in <VOC2012>/SegmentationClassAug",
                    "voc12"),
    "voc12_saliency": ("the PFAN saliency maps of VOC (EPS README), in <VOC2012>/SALImages", "voc12"),
    "coco_images": ("COCO 2014 train2014.zip / val2014.zip / annotations_trainval2014.zip, in "
                    "<coco>/train2014, <coco>/val2014, <coco>/annotations", "coco"),
    "coco_masks": ("the COCO masks of EPS in <coco>/SegmentationClass/{train2014,val2014} (or python "
                   "tools/make_coco_masks.py --data-root <coco>)", "coco"),
    "coco_saliency": ("the PFAN saliency maps of COCO train2014 (EPS README), in <coco>/SALImages",
                      "coco"),
    "coco_labels": ("COCO image labels are not shipped; they are made from the annotations (python "
                    "tools/make_cls_labels.py --dataset coco --data-root <coco> --out "
                    "metadata/coco/image_labels.txt)", "coco"),
    "imagenet_resnet38": ("ilsvrc-cls_rna-a1_cls1000_ep-0001.params, the ImageNet ResNet-38 of the "
                          "EPS and PSA READMEs, in weights/", "weights"),
    "deeplab_init": ("deeplabv1_resnet101-coco.pth, the COCO DeepLab-v2 init converted from DeepLab's "
                     "init.caffemodel, in weights/", "weights"),
    "released": ("the released EPS checkpoints, weights/{voc12,coco}_{cls,eps}.pth", "released"),
}
DOWNLOADS: Dict[str, str] = {k: f"{text}: bash script/download.sh {item}" for k, (text, item)
                             in _HINTS.items()}


def hint(key: str) -> str:
    """One sentence for an error message: what the file is and the command that fetches it."""
    return f"{DOWNLOADS[key]} {HINT_SUFFIX}"


def item_rows(items: Iterable[str], items_table: Optional[Dict[str, Tuple[str, ...]]] = None
              ) -> List[str]:
    """Row keys of the items in order, each once ("all": every item)."""
    table = ITEMS if items_table is None else items_table
    out: List[str] = []
    for item in items:
        for key in (k for keys in table.values() for k in keys) if item == "all" else table[item]:
            if key not in out:
                out.append(key)
    return out


# ------------------------------------------------------------------------------------------------
# a table as JSON: for tests, which serve small fixture archives with their own checksums and
# counts (tools/download.py reads one from $EPS_DOWNLOAD_TABLE and says so)
# ------------------------------------------------------------------------------------------------
def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def row_from_dict(d: dict) -> Row:
    kw = {f.name: _tuples(d[f.name]) for f in fields(Row) if f.name in d}
    kw["sources"] = tuple(Source(*s) if isinstance(s, (list, tuple)) else Source(**s)
                          for s in d.get("sources", ()))
    kw["place"] = tuple(Place(**p) for p in d.get("place", ()))
    kw["checks"] = tuple(Check(**{k: _tuples(v) for k, v in c.items()}) for c in d.get("checks", ()))
    return Row(**kw)


def table_to_json(rows: Dict[str, Row], items: Dict[str, Tuple[str, ...]]) -> str:
    return json.dumps({"rows": [asdict(r) for r in rows.values()],
                       "items": {k: list(v) for k, v in items.items()}}, indent=1)


def table_from_json(path) -> Tuple[Dict[str, Row], Dict[str, Tuple[str, ...]]]:
    data = json.loads(Path(path).read_text())
    rows = {r.key: r for r in map(row_from_dict, data["rows"])}
    return rows, {k: tuple(v) for k, v in data["items"].items()}

