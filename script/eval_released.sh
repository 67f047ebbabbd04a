#!/usr/bin/env bash
# Evaluate a released (or any trained) EPS / baseline checkpoint: pseudo-masks on the published
# list (VOC train 1,464 / COCO train 82,081), thr 0.20, no CRF, then their mIoU next to the
# published number.
#
#   bash script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR]
#   CHECKPOINT=... DATASET_ROOT=... DATASET=coco NGPUS=2 bash script/eval_released.sh
#
# DATASET_ROOT: VOC: the VOC2012 folder with JPEGImages/ and SegmentationClassAug/;
#               COCO: the folder with train2014/ and SegmentationClass/train2014/.
# The released checkpoints and where to get them: README "Downloads" and "Model zoo". Extra flags
# for infer.py go in INFER_ARGS (e.g. INFER_ARGS="--num-workers 8"); NGPUS=2 runs two processes
# (torchrun); DEVICE=cpu runs on the CPU. Like the pipelines, every input is checked first
# (tools/preflight.py) and a rerun continues where it stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CHECKPOINT=${1:-${CHECKPOINT:-}}
DATASET_ROOT=${2:-${DATASET_ROOT:-}}
DATASET=${3:-${DATASET:-voc12}}
[[ -n "$CHECKPOINT" && -n "$DATASET_ROOT" ]] || \
  die "usage: script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR]"
[[ "$DATASET" == voc12 || "$DATASET" == coco ]] || die "DATASET must be voc12 or coco, got '$DATASET'"
OUT_DIR=${4:-${OUT_DIR:-$REPO/results/released_$(basename "${CHECKPOINT%.*}")_${DATASET}}}
NGPUS=${NGPUS:-${NPROC:-1}}
NNODES=1 NODE_RANK=0
DEVICE=${DEVICE:-cuda}
INFER_ARGS=${INFER_ARGS:-}
positive_int NGPUS "$NGPUS"

# The published list, threshold and ground truth of the README's "Train(mIoU)" column (LIST: any
# other id list, e.g. LIST=val).
LIST=${LIST:-$REPO/metadata/$DATASET/train.txt}
words X "$INFER_ARGS"
INFER_CMD=("$REPO/infer.py" --dataset "$DATASET" --infer_list "$LIST" --img_root "$DATASET_ROOT"
           --weights "$CHECKPOINT" --thr 0.20 --png-dir "$OUT_DIR/png" --cam-dir "$OUT_DIR/cam"
           --vis-dir "$OUT_DIR/vis" --vis-num 20 --run-dir "$OUT_DIR/infer_run" --device "$DEVICE"
           "${X[@]}")
EVAL_CMD=("$REPO/evaluate.py" --dataset "$DATASET" --datalist "$LIST" --data-root "$DATASET_ROOT"
          --pred_dir "$OUT_DIR/png" --save_path "$OUT_DIR/miou.txt" --overwrite)

# 0. every input checked before anything is written (nothing is left behind on failure)
"$PYTHON" "$REPO/tools/preflight.py" --title "released checkpoint $CHECKPOINT on $DATASET" \
  --device "$DEVICE" --procs "*=$NGPUS" "eval=1" -- \
  infer "${INFER_CMD[@]}" ::: eval "${EVAL_CMD[@]}" || exit 2
# Which network the file holds decides the published number to compare with (by its record, else
# by its shapes: network/weights.py identify_checkpoint).
read -r NETWORK HEAD < <("$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); \
from data.registry import get_dataset; from network import network_parts; \
from network.weights import identify_checkpoint, load_state_dict_file; \
found = identify_checkpoint(load_state_dict_file(sys.argv[2]), get_dataset(sys.argv[3]).num_classes); \
print(found.network, network_parts(found.network)[1].name)" "$REPO" "$CHECKPOINT" "$DATASET") || exit 2
PUBLISHED=$(published "$DATASET" "$HEAD")

# 1. CAMs + pseudo-masks (resumable: rerunning skips finished images) -> $OUT_DIR/{png,cam,vis}
say "pseudo-masks of $(basename "$LIST") with $NETWORK -> $OUT_DIR"
launch "$NGPUS" "${INFER_CMD[@]}"
# 2. mIoU of the pseudo-masks against the GT -> $OUT_DIR/miou.txt (+ .json)
"$PYTHON" "${EVAL_CMD[@]}"
# 3. ours next to the published number
echo
echo "| dataset | network | list | published mIoU | this run |"
echo "|---|---|---|---|---|"
echo "| $DATASET | $NETWORK | $(list_name "$LIST") | $PUBLISHED | $(miou_of "$OUT_DIR/miou.txt") |"
