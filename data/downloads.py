"""Where each input comes from, in one place: the hints that errors and the pipelines' preflight
print. The README's "Downloads" table is the full version (sources, sizes, where files go)."""
from __future__ import annotations

DOWNLOADS = {
    "voc12_images": "PASCAL VOC 2012 images: VOCtrainval_11-May-2012.tar from "
                    "host.robots.ox.ac.uk/pascal/VOC/voc2012; the root is its VOCdevkit/VOC2012 folder",
    "voc12_masks": "SegmentationClassAug, the SBD-augmented VOC masks (linked in the EPS and PSA "
                   "READMEs), extracted into <VOC2012>/SegmentationClassAug",
    "voc12_saliency": "the PFAN saliency maps of VOC (the EPS README's saliency-map link), "
                      "extracted into <VOC2012>/SALImages",
    "coco_images": "COCO 2014 train2014.zip / val2014.zip from cocodataset.org, extracted into "
                   "<coco>/train2014 and <coco>/val2014",
    "coco_masks": "the COCO masks of EPS (its README's Google Drive link) in "
                  "<coco>/SegmentationClass/{train2014,val2014}, or python tools/make_coco_masks.py",
    "coco_saliency": "the PFAN saliency maps of COCO train2014 (the EPS README's saliency-map "
                     "link), extracted into <coco>/SALImages",
    "coco_labels": "COCO image labels are not shipped: python tools/make_cls_labels.py --dataset "
                   "coco --data-root <coco> (needs annotations/instances_{train,val}2014.json)",
    "imagenet_resnet38": "ilsvrc-cls_rna-a1_cls1000_ep-0001.params, the ImageNet ResNet-38 of "
                         "ademxapp (linked in the PSA and EPS READMEs), into weights/",
    "deeplab_init": "deeplabv1_resnet101-coco.pth: deeplab-pytorch scripts/setup_caffemodels.sh, "
                    "then convert.py --dataset coco, into weights/",
    "released": "the released EPS checkpoints (the EPS README's checkpoint links)",
}


def hint(key: str) -> str:
    """One sentence for an error message: what the file is, where it comes from."""
    return f"{DOWNLOADS[key]} (README 'Downloads')"
