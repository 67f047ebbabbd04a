#!/usr/bin/env bash
# Evaluate a released (or any trained) EPS / baseline checkpoint: pseudo-masks on the published
# list (VOC train 1464 / COCO train 82081), thr 0.20, no CRF, then mIoU next to the README value.
#
#   script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR]
#   CHECKPOINT=... DATASET_ROOT=... DATASET=coco script/eval_released.sh
#
# DATASET_ROOT: VOC: the VOC2012 folder with JPEGImages/ and SegmentationClassAug/;
#               COCO: the folder with train2014/ and SegmentationClass/train2014/.
# Extra flags for infer.py go in INFER_ARGS (e.g. INFER_ARGS="--num-workers 8"); for several
# GPUs set NPROC=2 (torchrun).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT=${1:-${CHECKPOINT:-}}
DATASET_ROOT=${2:-${DATASET_ROOT:-}}
DATASET=${3:-${DATASET:-voc12}}
OUT_DIR=${4:-${OUT_DIR:-results/released_$(basename "${CHECKPOINT%.*}")_${DATASET}}}
INFER_ARGS=${INFER_ARGS:-}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}

usage="usage: script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR]"
[[ -n "$CHECKPOINT" && -n "$DATASET_ROOT" ]] || { echo "$usage" >&2; exit 2; }
[[ -f "$CHECKPOINT" ]] || { echo "checkpoint not found: $CHECKPOINT (download the released checkpoint_cls.pth first)" >&2; exit 2; }
[[ -d "$DATASET_ROOT" ]] || { echo "dataset root not found: $DATASET_ROOT" >&2; exit 2; }

case "$DATASET" in
  voc12) LIST=metadata/voc12/train.txt; IMG_ROOT=$DATASET_ROOT/JPEGImages
         GT_DIR=$DATASET_ROOT/SegmentationClassAug ;;
  coco)  LIST=metadata/coco/train.txt; IMG_ROOT=$DATASET_ROOT
         GT_DIR=$DATASET_ROOT/SegmentationClass/train2014 ;;
  *) echo "DATASET must be voc12 or coco, got '$DATASET'" >&2; exit 2 ;;
esac
[[ -d "$IMG_ROOT" ]] || { echo "image folder not found: $IMG_ROOT" >&2; exit 2; }
[[ -d "$GT_DIR" ]] || { echo "ground-truth folder not found: $GT_DIR (VOC: SegmentationClassAug; COCO: the EPS masks under SegmentationClass/train2014)" >&2; exit 2; }
[[ -f "metadata/$DATASET/image_labels.txt" ]] || { echo "metadata/$DATASET/image_labels.txt is missing: build it with tools/make_cls_labels.py" >&2; exit 2; }

# Which head the checkpoint holds decides the published number to compare with (the dataset
# registry's published_miou, keyed by head); a file that cannot be identified is left to
# infer.py, which says why in one line.
read -r HEAD PUBLISHED < <($PYTHON -c "import sys; from data.registry import get_dataset; \
from network.registry import get_head; \
from network.weights import identify_checkpoint, load_state_dict_file; \
info = get_dataset(sys.argv[2]); \
head = get_head(identify_checkpoint(load_state_dict_file(sys.argv[1]), info.num_classes).network).name; \
print(head, info.spec.published_miou.get(head, 'n/a'))" "$CHECKPOINT" "$DATASET" 2>/dev/null || echo "? n/a")

# 1. CAMs + pseudo-masks (resumable: rerunning skips finished images) -> $OUT_DIR/{png,cam,vis}
if [[ "$NPROC" -gt 1 ]]; then LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC"); else LAUNCH=("$PYTHON"); fi
# shellcheck disable=SC2086
"${LAUNCH[@]}" infer.py --dataset "$DATASET" --infer_list "$LIST" --img_root "$IMG_ROOT" \
  --weights "$CHECKPOINT" --thr 0.20 --cam_png "$OUT_DIR/png" --cam-dir "$OUT_DIR/cam" \
  --vis-dir "$OUT_DIR/vis" --vis-num 20 $INFER_ARGS

# 2. mIoU of the pseudo-masks against the GT -> $OUT_DIR/miou.txt
$PYTHON evaluate.py --dataset "$DATASET" --datalist "$LIST" --gt_dir "$GT_DIR" \
  --pred_dir "$OUT_DIR/png" --save_path "$OUT_DIR/miou.txt" --overwrite

# 3. ours vs published (the "-  mean" row of the evaluate_png-style table holds the mIoU)
OURS=$(awk '$2 == "mean" {print $3; exit}' "$OUT_DIR/miou.txt" || true)
echo
echo "| dataset | head | list | published mIoU | this run |"
echo "|---|---|---|---|---|"
echo "| $DATASET | $HEAD | $(basename "$LIST") | $PUBLISHED | ${OURS:-see $OUT_DIR/miou.txt} |"
