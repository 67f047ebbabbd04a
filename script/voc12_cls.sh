#!/usr/bin/env bash
# CAM baseline on PASCAL VOC 2012: the published script/voc12_cls.sh (train -> pseudo-masks on
# train -> mIoU); the DeepLab stages of voc12_eps.sh are available but off by default.
#
#   DATASET_ROOT=/data/VOCdevkit/VOC2012 WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   NGPUS=2 bash script/voc12_cls.sh
#
# Stages (STAGES, in this order); the recipe is the published one (data/registry.py):
#   train    CAM classifier (ResNet-38) on train_aug              20k iterations, batch 8, crop 448
#   infer    CAMs -> pseudo-masks on train (the published list)   thr 0.20, no CRF
#   eval     pseudo-mask mIoU on train vs SegmentationClassAug    published: 47.05
#   pseudo, seg, segeval   (not run by default: STAGES="train infer eval pseudo seg segeval")
#            DeepLab-v2 on the baseline's train_aug pseudo-masks -> val mIoU (no published number)
# See script/voc12_eps.sh for resume, overrides, CHECK_ONLY=1 and several machines.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

DATASET=${DATASET:-voc12}
NETWORK=${NETWORK:-resnet38_cls}
SESSION=${SESSION:-voc12_cls}
STAGES=${STAGES:-train infer eval}
# ---- inputs (README "Downloads") ----------------------------------------------------------------
DATASET_ROOT=${DATASET_ROOT:-$REPO/datasets/VOCdevkit/VOC2012}  # JPEGImages/, SegmentationClassAug/
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}  # 'none': from scratch
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}            # 'none': from scratch
METADATA_DIR=${METADATA_DIR:-}  # labels.txt, image_labels.txt, lists; empty: metadata/voc12
SEG_CRF=${SEG_CRF:-1}
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}

run_pipeline
# Outputs: $SAVE_ROOT/$SESSION/ as in script/voc12_eps.sh
