#!/usr/bin/env bash
# EPS on COCO 2014: the published script/coco_eps.sh (train -> pseudo-masks on train -> mIoU),
# then the second stage (DeepLab-v2 on the train pseudo-masks -> val2014 mIoU).
#
#   DATASET_ROOT=/data/coco WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   SEG_INIT=/weights/deeplabv1_resnet101-coco.pth NGPUS=2 bash script/coco_eps.sh
#
# Stages (STAGES, in this order); the recipe is the published one (data/registry.py, train_seg.py):
#   train    EPS classifier (ResNet-38) on train (82,081)          256.5k iterations, batch 16, crop 321
#   infer    CAMs -> pseudo-masks on train                         thr 0.20, no CRF
#   eval     pseudo-mask mIoU on train vs SegmentationClass/train2014   published: 37.15
#   pseudo   (not needed by default: DeepLab trains on the same train list as infer)
#   seg      DeepLab-v2 ResNet-101 on the train pseudo-masks (VOC recipe; none was published for COCO)
#   segeval  DeepLab on val (40,137) -> mIoU (SEG_CRF=1 adds the dense CRF: slow on 40k images)
# COCO image labels are not shipped: python tools/make_cls_labels.py --dataset coco ... (README).
# See script/voc12_eps.sh for resume, overrides, CHECK_ONLY=1 and several machines.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

DATASET=${DATASET:-coco}
NETWORK=${NETWORK:-resnet38_eps}
SESSION=${SESSION:-coco_eps}
STAGES=${STAGES:-train infer eval seg segeval}
# ---- inputs (README "Downloads") ----------------------------------------------------------------
DATASET_ROOT=${DATASET_ROOT:-$REPO/datasets/coco}   # train2014/, val2014/, SegmentationClass/
SALIENCY_ROOT=${SALIENCY_ROOT:-$DATASET_ROOT/SALImages}
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}
METADATA_DIR=${METADATA_DIR:-}  # labels.txt, image_labels.txt, lists; empty: metadata/coco
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}

run_pipeline
# Outputs: $SAVE_ROOT/$SESSION/ as in script/voc12_eps.sh (deeplab/val/ for val2014)
