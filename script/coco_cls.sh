#!/usr/bin/env bash
# CAM baseline on COCO 2014: the published script/coco_cls.sh (train -> pseudo-masks on train ->
# mIoU); the DeepLab stages of coco_eps.sh are available but off by default.
#
#   DATASET_ROOT=/data/coco WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   NGPUS=2 bash script/coco_cls.sh
#
# Every variable below can be set from the environment. Stages (STAGES, in this order):
#   train    CAM classifier (ResNet-38) on train (82,081)          published: 256.5k iters, batch 16
#   infer    CAMs -> pseudo-masks on train                         published: thr 0.20, no CRF
#   eval     pseudo-mask mIoU on train vs SegmentationClass/train2014   published: 31.23
#   pseudo, seg, segeval   (not run by default: STAGES="train infer eval seg segeval")
#            DeepLab-v2 on the baseline's pseudo-masks -> val mIoU (no published number)
# SKIP_SEG=1 drops them again. A stage whose outputs are complete is skipped, so rerunning the
# same command resumes where it stopped (an unfinished training run continues from its checkpoint).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

# ---- inputs -----------------------------------------------------------------------------------
DATASET=${DATASET:-coco}
DATASET_ROOT=${DATASET_ROOT:-$REPO/datasets/coco}   # holds train2014/, val2014/, SegmentationClass/
GT_DIR=${GT_DIR:-$DATASET_ROOT/SegmentationClass/train2014}
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}  # 'none': from scratch
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}            # 'none': from scratch
METADATA_DIR=${METADATA_DIR:-}        # labels.txt, image_labels.txt, lists; empty: metadata/coco
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}
SESSION=${SESSION:-coco_cls}
# ---- hardware ----------------------------------------------------------------------------------
NGPUS=${NGPUS:-1}             # >1: torchrun; batch sizes stay global (published: 2 GPUs)
DEVICE=${DEVICE:-auto}
NUM_WORKERS=${NUM_WORKERS:-8}
# ---- classifier (EPS script/coco_cls.sh; docs/training.md) --------------------------------------
NETWORK=${NETWORK:-resnet38_cls}
TRAIN_LIST=${TRAIN_LIST:-train}
CROP=${CROP:-321}
RESIZE=${RESIZE:-256 448}
MAX_ITERS=${MAX_ITERS:-256500}
BATCH=${BATCH:-16}
LR=${LR:-0.01}
WT_DEC=${WT_DEC:-5e-4}
# ---- pseudo-masks ------------------------------------------------------------------------------
INFER_LIST=${INFER_LIST:-train}
THR=${THR:-0.20}
VIS_NUM=${VIS_NUM:-20}
SAVE_CAMS=${SAVE_CAMS:-0}     # 1: also keep <id>.npz CAMs (for evaluate.py --cam-dir sweeps)
# ---- DeepLab-v2 (deeplab-pytorch configs/voc12.yaml; docs/segmentation.md) ---------------------
SEG_LIST=${SEG_LIST:-train}
SEG_EVAL_LIST=${SEG_EVAL_LIST:-val}
SEG_GT_DIR=${SEG_GT_DIR:-$DATASET_ROOT/SegmentationClass/val2014}
SEG_ARCH=${SEG_ARCH:-deeplabv2_resnet101}
SEG_ITERS=${SEG_ITERS:-20000}
# effective batch 10: 5 x 2 accumulated on one process, 10 x 1 split over several
if (( ${NGPUS:-1} > 1 )); then SEG_BATCH=${SEG_BATCH:-10}; SEG_ITER_SIZE=${SEG_ITER_SIZE:-1}; fi
SEG_BATCH=${SEG_BATCH:-5}
SEG_ITER_SIZE=${SEG_ITER_SIZE:-2}
SEG_CROP=${SEG_CROP:-321}
SEG_LR=${SEG_LR:-2.5e-4}
SEG_CRF=${SEG_CRF:-1}         # also score the dense-CRF result (DeepLab parameters)
SEG_CRF_WORKERS=${SEG_CRF_WORKERS:-$NUM_WORKERS}
# ---- extra flags passed through, e.g. TRAIN_ARGS="--amp bf16" INFER_ARGS="--scales 1.0" --------
TRAIN_ARGS=${TRAIN_ARGS:-} INFER_ARGS=${INFER_ARGS:-} EVAL_ARGS=${EVAL_ARGS:-}
SEG_ARGS=${SEG_ARGS:-} SEGINFER_ARGS=${SEGINFER_ARGS:-}
STAGES=${STAGES:-train infer eval}
PUBLISHED_PSEUDO=31.23        # EPS README, COCO train, baseline pseudo-masks
PUBLISHED_SEG=n/a             # no COCO DeepLab number to compare with (docs/pipelines.md)

METHOD_ARGS=()  # the CAM baseline takes no saliency, tau or lambda
prepare_run

# ---- check every input the selected stages need, before any work ------------------------------
need_dir "$DATASET_ROOT" "Download COCO 2014 (train2014.zip, and val2014.zip for the DeepLab val \
stage, from https://cocodataset.org) and set DATASET_ROOT to the folder holding train2014/ (default: \
datasets/coco in the repository)."
if want train || want infer || want pseudo; then
  need_dir "$DATASET_ROOT/train2014" "Extract train2014.zip (cocodataset.org) into DATASET_ROOT."
  need_file "${METADATA_DIR:-$REPO/metadata/coco}/image_labels.txt" "COCO image labels are not \
shipped: make them from annotations/instances_train2014.json and instances_val2014.json with \
python tools/make_cls_labels.py --dataset coco --data-root $DATASET_ROOT --out \
${METADATA_DIR:-metadata/coco}/image_labels.txt"
fi
if want train && [[ ! -f "$CKPT" ]]; then
  [[ "$WEIGHTS" == none ]] || need_file "$WEIGHTS" "Download the ImageNet ResNet-38 weights \
ilsvrc-cls_rna-a1_cls1000_ep-0001.params (linked in the EPS / PSA READMEs) and set WEIGHTS to the file \
(default: weights/ in the repository)."
fi
if want eval; then
  need_dir "$GT_DIR" "Download the COCO train2014 masks EPS used (its README's Google Drive link, \
SegmentationClass/train2014) into $DATASET_ROOT/SegmentationClass/train2014, or make them with \
python tools/make_coco_masks.py --data-root $DATASET_ROOT (needs annotations/instances_train2014.json)."
fi
if want seg && [[ ! -f "$SEG_DIR/checkpoint_final.pth" && "$SEG_INIT" != none ]]; then
  need_file "$SEG_INIT" "DeepLab-v2 starts from the COCO-pretrained deeplabv1_resnet101-coco.pth: \
make it with kazuto1011/deeplab-pytorch (scripts/setup_caffemodels.sh, then convert.py --dataset \
coco) and set SEG_INIT to it; SEG_INIT=none trains from scratch (not the paper's setting), SKIP_SEG=1 \
skips the DeepLab stages."
fi
if want segeval; then
  need_dir "$DATASET_ROOT/val2014" "Extract val2014.zip (https://cocodataset.org) into DATASET_ROOT."
  need_dir "$SEG_GT_DIR" "Download the EPS COCO val2014 masks (SegmentationClass/val2014) or make \
them with python tools/make_coco_masks.py --data-root $DATASET_ROOT; or set SEG_GT_DIR."
fi

# ---- 1. train the CAM classifier ---------------------------------------------------------------
if want train; then stage_train; fi
# -> $RUN_DIR/checkpoint_cls.pth (final weights), checkpoint_last.pth (resume state), log.txt,
#    metrics.jsonl, loss.png, args.json, env.json

# ---- 2. CAMs -> pseudo-masks on the evaluation list --------------------------------------------
if want infer; then stage_infer; fi
# -> $RESULT/png/<id>.png pseudo-masks (0 = background, c+1 = class c), $RESULT/vis/ overlays,
#    [$RESULT/cam/<id>.npz with SAVE_CAMS=1], $RESULT/infer_run/ (args, log); done ids are skipped

# ---- 3. pseudo-mask mIoU -----------------------------------------------------------------------
if want eval; then stage_eval; fi
# -> $EVAL_TXT (published table: mean row, then per-class IoU / precision / recall) and .json

# ---- 4. pseudo-masks for DeepLab's training list (the infer list already, unless SEG_LIST differs)
if want pseudo; then stage_pseudo; fi
# -> more $RESULT/png/<id>.png: infer.py skips the ids of stage 2 and makes the rest of the list

# ---- 5. DeepLab-v2 on the pseudo-masks ---------------------------------------------------------
if want seg; then stage_seg; fi
# -> $SEG_DIR/checkpoint_final.pth (deeplab-pytorch layout), checkpoint_last.pth, checkpoint_<it>.pth,
#    log.txt, metrics.jsonl

# ---- 6. DeepLab on val (+ dense CRF) -> mIoU ---------------------------------------------------
if want segeval; then stage_segeval; fi
# -> $SEG_PRED/<id>.png, ${SEG_PRED}_crf/<id>.png, ${SEG_PRED}_eval.txt / _crf_eval.txt (+ .json),
#    ${SEG_PRED}_run/ (args, log)

# ---- results next to the published numbers -----------------------------------------------------
print_results
