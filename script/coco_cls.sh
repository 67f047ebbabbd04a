#!/usr/bin/env bash
# CAM baseline on COCO 2014: the published script/coco_cls.sh (train -> pseudo-masks on train ->
# mIoU); DeepLab stages off by default.
#
#   DATASET_ROOT=/data/coco WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   NGPUS=2 bash script/coco_cls.sh
#
# Stages (STAGES, in this order); the recipe is the published one (data/registry.py):
#   train    CAM classifier (ResNet-38) on train (82,081)          256.5k iterations, batch 16, crop 321
#   infer    CAMs -> pseudo-masks on train                         thr 0.20, no CRF
#   eval     pseudo-mask mIoU on train vs SegmentationClass/train2014   published: 31.23
# See script/voc12_eps.sh for resume, overrides, CHECK_ONLY=1 and several machines.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

DATASET=${DATASET:-coco}
NETWORK=${NETWORK:-resnet38_cls}
SESSION=${SESSION:-coco_cls}
STAGES=${STAGES:-train infer eval}
# ---- inputs (README "Downloads") ----------------------------------------------------------------
DATASET_ROOT=${DATASET_ROOT:-$REPO/datasets/coco}   # train2014/, SegmentationClass/train2014/
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}
METADATA_DIR=${METADATA_DIR:-}  # labels.txt, image_labels.txt, lists; empty: metadata/coco
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}

run_pipeline
# Outputs: $SAVE_ROOT/$SESSION/ as in script/voc12_eps.sh
