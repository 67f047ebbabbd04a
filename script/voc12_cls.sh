#!/usr/bin/env bash
# CAM baseline on PASCAL VOC 2012: the published script/voc12_cls.sh (train -> pseudo-masks on
# train -> mIoU); the DeepLab stages of voc12_eps.sh are available but off by default.
#
#   DATASET_ROOT=/data/VOCdevkit/VOC2012 WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   NGPUS=2 bash script/voc12_cls.sh
#
# Every variable below can be set from the environment. Stages (STAGES, in this order):
#   train    CAM classifier (ResNet-38) on train_aug               published: 20k iters, batch 8
#   infer    CAMs -> pseudo-masks on train (the published list)    published: thr 0.20, no CRF
#   eval     pseudo-mask mIoU on train vs SegmentationClassAug     published: 47.05
#   pseudo, seg, segeval   (not run by default: STAGES="train infer eval pseudo seg segeval")
#            DeepLab-v2 on the baseline's train_aug pseudo-masks -> val mIoU (no published number)
# SKIP_SEG=1 drops them again. A stage whose outputs are complete is skipped, so rerunning the
# same command resumes where it stopped (an unfinished training run continues from its checkpoint).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

# ---- inputs -----------------------------------------------------------------------------------
DATASET=${DATASET:-voc12}
DATASET_ROOT=${DATASET_ROOT:-$REPO/datasets/VOCdevkit/VOC2012}  # JPEGImages/, SegmentationClassAug/
GT_DIR=${GT_DIR:-$DATASET_ROOT/SegmentationClassAug}
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}  # 'none': from scratch
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}            # 'none': from scratch
METADATA_DIR=${METADATA_DIR:-}        # labels.txt, image_labels.txt, lists; empty: metadata/voc12
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}
SESSION=${SESSION:-voc12_cls}
# ---- hardware ----------------------------------------------------------------------------------
NGPUS=${NGPUS:-1}             # >1: torchrun; batch sizes stay global (published: 2 GPUs)
DEVICE=${DEVICE:-auto}
NUM_WORKERS=${NUM_WORKERS:-8}
# ---- classifier (EPS script/voc12_cls.sh; docs/training.md) -------------------------------------
NETWORK=${NETWORK:-resnet38_cls}
TRAIN_LIST=${TRAIN_LIST:-train_aug}
CROP=${CROP:-448}
RESIZE=${RESIZE:-256 512}
MAX_ITERS=${MAX_ITERS:-20000}
BATCH=${BATCH:-8}
LR=${LR:-0.01}
WT_DEC=${WT_DEC:-5e-4}
# ---- pseudo-masks ------------------------------------------------------------------------------
INFER_LIST=${INFER_LIST:-train}
THR=${THR:-0.20}
VIS_NUM=${VIS_NUM:-20}
SAVE_CAMS=${SAVE_CAMS:-0}     # 1: also keep <id>.npz CAMs (for evaluate.py --cam-dir sweeps)
# ---- DeepLab-v2 (deeplab-pytorch configs/voc12.yaml; docs/segmentation.md) ---------------------
SEG_LIST=${SEG_LIST:-train_aug}
SEG_EVAL_LIST=${SEG_EVAL_LIST:-val}
SEG_GT_DIR=${SEG_GT_DIR:-$GT_DIR}
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
PUBLISHED_PSEUDO=47.05        # EPS README, VOC train, baseline pseudo-masks
PUBLISHED_SEG=n/a             # the paper's DeepLab number is for EPS masks only

METHOD_ARGS=()  # the CAM baseline takes no saliency, tau or lambda
prepare_run

# ---- check every input the selected stages need, before any work ------------------------------
need_dir "$DATASET_ROOT" "Download VOC2012 (VOCtrainval_11-May-2012.tar, \
http://host.robots.ox.ac.uk/pascal/VOC/voc2012/), extract it and set DATASET_ROOT to its \
VOCdevkit/VOC2012 folder (default: datasets/VOCdevkit/VOC2012 in the repository)."
if want train || want infer || want pseudo || want segeval; then
  need_dir "$DATASET_ROOT/JPEGImages" "DATASET_ROOT must be the VOC2012 folder holding JPEGImages/."
fi
if want train && [[ ! -f "$CKPT" ]]; then
  [[ "$WEIGHTS" == none ]] || need_file "$WEIGHTS" "Download the ImageNet ResNet-38 weights \
ilsvrc-cls_rna-a1_cls1000_ep-0001.params (linked in the EPS / PSA READMEs) and set WEIGHTS to the file \
(default: weights/ in the repository)."
fi
if want eval; then
  need_dir "$GT_DIR" "Download SegmentationClassAug (the SBD-augmented VOC masks, linked in the \
EPS / PSA READMEs) and extract it to $DATASET_ROOT/SegmentationClassAug, or set GT_DIR."
fi
if want seg && [[ ! -f "$SEG_DIR/checkpoint_final.pth" && "$SEG_INIT" != none ]]; then
  need_file "$SEG_INIT" "DeepLab-v2 starts from the COCO-pretrained deeplabv1_resnet101-coco.pth: \
make it with kazuto1011/deeplab-pytorch (scripts/setup_caffemodels.sh, then convert.py --dataset \
coco) and set SEG_INIT to it; SEG_INIT=none trains from scratch (not the paper's setting), SKIP_SEG=1 \
skips the DeepLab stages."
fi
if want segeval; then
  need_dir "$SEG_GT_DIR" "The val masks are part of SegmentationClassAug (or VOC's \
SegmentationClass): set SEG_GT_DIR."
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

# ---- 4. pseudo-masks for DeepLab's training list (train_aug) -----------------------------------
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
