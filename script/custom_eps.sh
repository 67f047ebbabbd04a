#!/usr/bin/env bash
# EPS on your own images (docs/custom-data.md): a folder of images, a class list and an image-label
# file in the --dataset custom layout (docs/data.md) -> saliency maps -> EPS classifier ->
# pseudo-masks -> DeepLab-v2.
#
#   DATASET_ROOT=/data/mine WEIGHTS=/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
#   SEG_INIT=/weights/deeplabv1_resnet101-coco.pth NGPUS=2 bash script/custom_eps.sh
#   CHECK_ONLY=1 DATASET_ROOT=/data/mine bash script/custom_eps.sh   # check and plan, run nothing
#
# DATASET_ROOT holds JPEGImages/<id>.jpg, labels.txt, image_labels.txt, train.txt (the training
# list) and, optionally, val.txt and ground-truth masks (SegmentationClassAug/ or
# SegmentationClass/). Stages (STAGES, in this order):
#   saliency  U^2-Net saliency maps of the training list (tools/make_saliency.py; needs
#             pip install -r requirements-saliency.txt) unless every map exists in SALIENCY_ROOT
#   train     EPS classifier (ResNet-38), the VOC recipe        20k iterations, batch 8, crop 448
#   infer     CAMs -> pseudo-masks on INFER_LIST (train)         thr 0.20, overlays in result/vis
#   eval      their mIoU, when ground truth exists (else skipped, saying so)
#   pseudo    pseudo-masks for the rest of SEG_LIST (train)
#   seg       DeepLab-v2 ResNet-101 on the pseudo-masks
#   segeval   DeepLab on SEG_EVAL_LIST (val; skipped without val.txt): mIoU when ground truth
#             exists, else its predictions only
# The same preflight, CHECK_ONLY, NGPUS / NNODES and resume behaviour as script/voc12_eps.sh
# (docs/pipelines.md). With NNODES > 1 the saliency stage runs on node 0; the other nodes wait
# for its maps. SKIP_SEG=1 stops after eval.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_stages.sh"

DATASET=custom
NETWORK=${NETWORK:-resnet38_eps}
SESSION=${SESSION:-custom_eps}
PIPELINE_STAGES="saliency train infer eval pseudo seg segeval"
STAGES=${STAGES:-$PIPELINE_STAGES}
# ---- inputs -------------------------------------------------------------------------------------
DATASET_ROOT=${DATASET_ROOT:-}
[[ -n "$DATASET_ROOT" ]] || die "set DATASET_ROOT to your dataset root (JPEGImages/, labels.txt, image_labels.txt, train.txt; docs/custom-data.md)"
need_dir "$DATASET_ROOT" "Set DATASET_ROOT to your dataset root (docs/custom-data.md)."
METADATA_DIR=${METADATA_DIR:-}    # labels.txt, image_labels.txt and the lists; empty: DATASET_ROOT
TRAIN_LIST=${TRAIN_LIST:-train}   # EPS's training list (and the saliency stage's)
INFER_LIST=${INFER_LIST:-train}   # pseudo-masks scored by eval
SEG_LIST=${SEG_LIST:-train}       # DeepLab's training list
SEG_EVAL_LIST=${SEG_EVAL_LIST:-val}
SALIENCY_ROOT=${SALIENCY_ROOT:-$DATASET_ROOT/SALImages}
SAL_MODEL=${SAL_MODEL:-u2net}     # rembg model (tools/make_saliency.py --model)
SAL_MODEL_PATH=${SAL_MODEL_PATH:-}  # a local .onnx instead of rembg's download
SAL_DEVICE=${SAL_DEVICE:-auto}    # onnxruntime's CUDA provider needs onnxruntime-gpu
WEIGHTS=${WEIGHTS:-$REPO/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params}  # 'none': from scratch
SEG_INIT=${SEG_INIT:-$REPO/weights/deeplabv1_resnet101-coco.pth}            # 'none': from scratch
SEG_CRF=${SEG_CRF:-0}             # 1: also score DeepLab + dense CRF (needs ground truth)
# ---- outputs: everything goes under $SAVE_ROOT/$SESSION -----------------------------------------
SAVE_ROOT=${SAVE_ROOT:-$REPO/runs}

# called by run_pipeline before the plan: the stages a dataset without ground truth or without a
# val list cannot run are dropped, saying why
adjust_stages() {
  local meta=${METADATA_DIR:-$DATASET_ROOT} gt=${GT_DIR:-} d
  if [[ -z "$gt" ]]; then
    for d in SegmentationClassAug SegmentationClass; do
      if [[ -d "$DATASET_ROOT/$d" ]]; then gt=$DATASET_ROOT/$d; break; fi
    done
  fi
  if [[ -z "$gt" ]]; then
    drop_stage eval "no ground truth (SegmentationClassAug/ or SegmentationClass/ in $DATASET_ROOT, or GT_DIR): nothing to score the pseudo-masks against"
    SEG_EVALUATE=0
    SEG_CRF=0
  fi
  if [[ ! -f "$SEG_EVAL_LIST" && ! -f "$meta/$SEG_EVAL_LIST" && ! -f "$meta/$SEG_EVAL_LIST.txt" ]]; then
    drop_stage segeval "no list '$SEG_EVAL_LIST' in $meta (SEG_EVAL_LIST): nothing to run DeepLab on"
  elif [[ -z "$gt" ]] && want segeval; then
    say "segeval: no ground truth, so DeepLab's predictions on $SEG_EVAL_LIST are written, not scored"
  fi
}

run_pipeline
# Outputs: $SAVE_ROOT/$SESSION/
#   checkpoint_cls.pth, log.txt, metrics.jsonl, loss.png                                   [train]
#   result/png/<id>.png pseudo-masks (0 = background, c+1 = class c), result/vis/ overlays  [infer, pseudo]
#   result/train_miou.txt (+ .json)                                                         [eval]
#   deeplab/checkpoint_final.pth (the segmentation model), deeplab/val/, val_eval.txt      [seg, segeval]
# and $SALIENCY_ROOT/<id>.png with saliency_model.json (the model that made them)            [saliency]
