#!/usr/bin/env bash
# EPS on PASCAL VOC 2012: the published script/voc12_eps.sh (train -> pseudo-masks on train ->
# mIoU), then the second stage (DeepLab-v2 on the train_aug pseudo-masks -> val mIoU).
#
#   DATASET_ROOT=/data/VOCdevkit/VOC2012 WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   SEG_INIT=/weights/deeplabv1_resnet101-coco.pth NGPUS=2 bash script/voc12_eps.sh
#   CHECK_ONLY=1 ... bash script/voc12_eps.sh      # check everything and print the plan, run nothing
#
# Stages (STAGES, in this order); the recipe is the published one (data/registry.py, train_seg.py):
#   train    EPS classifier (ResNet-38) on train_aug              20k iterations, batch 8, crop 448
#   infer    CAMs -> pseudo-masks on train (the published list)   thr 0.20, no CRF
#   eval     pseudo-mask mIoU on train vs SegmentationClassAug    published: 69.22
#   pseudo   pseudo-masks for the rest of train_aug (DeepLab's training set)
#   seg      DeepLab-v2 ResNet-101 on the train_aug pseudo-masks  deeplab-pytorch voc12.yaml
#   segeval  DeepLab on val (+ dense CRF) -> mIoU                 published: 70.9
# SKIP_SEG=1 stops after eval. A stage whose outputs are complete is skipped, so rerunning the
# same command resumes where it stopped. Every variable below can be set from the environment;
# the recipe variables (CROP, BATCH, TAU, SEG_ITERS, ...) are listed in docs/pipelines.md and
# are passed only when set. Several machines: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (script/slurm_voc12_eps.sbatch).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

DATASET=${DATASET:-voc12}
NETWORK=${NETWORK:-resnet38_eps}
SESSION=${SESSION:-voc12_eps}
STAGES=${STAGES:-train infer eval pseudo seg segeval}
# ---- inputs (README "Downloads") ----------------------------------------------------------------
DATASET_ROOT=${DATASET_ROOT:-$REPO/datasets/VOCdevkit/VOC2012}  # JPEGImages/, SegmentationClassAug/
SALIENCY_ROOT=${SALIENCY_ROOT:-$DATASET_ROOT/SALImages}          # PFAN saliency maps, <id>.png
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}  # 'none': from scratch
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}            # 'none': from scratch
METADATA_DIR=${METADATA_DIR:-}  # labels.txt, image_labels.txt, lists; empty: metadata/voc12
SEG_CRF=${SEG_CRF:-1}           # also score the dense-CRF result of DeepLab (as the paper)
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}

run_pipeline
# Outputs: $SAVE_ROOT/$SESSION/
#   checkpoint_cls.pth (final weights), checkpoint_last.pth, log.txt, metrics.jsonl, loss.png  [train]
#   result/png/<id>.png pseudo-masks (0 = background, c+1 = class c), result/vis/ overlays  [infer, pseudo]
#   result/train_miou.txt (+ .json)                                                         [eval]
#   deeplab/checkpoint_final.pth, deeplab/val/, deeplab/val_eval.txt, val_crf_eval.txt     [seg, segeval]
