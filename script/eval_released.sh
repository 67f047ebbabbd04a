#!/usr/bin/env bash
# Evaluate a released (or any trained) EPS / baseline checkpoint: pseudo-masks on the published
# list (VOC train 1,464 / COCO train 82,081), thr 0.20, no CRF, then their mIoU next to the
# published number.
#
#   bash script/download.sh released && bash script/eval_released.sh   # every released checkpoint
#   bash script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR]
#   CHECKPOINT=... DATASET_ROOT=... DATASET=coco NGPUS=2 bash script/eval_released.sh
#
# Without a checkpoint, it evaluates each of the four released checkpoints that
# `bash script/download.sh released` put in $DOWNLOAD_ROOT/weights (default: the repository's
# weights/), each on the dataset root the downloader lays out (datasets/VOCdevkit/VOC2012,
# datasets/coco), and prints one table against the published 47.05 / 69.22 (VOC) and
# 31.23 / 37.15 (COCO); a checkpoint or dataset not downloaded is a row saying which command
# fetches it. Where the files come from: data/downloads.py (README "Downloads").
# DATASET_ROOT: VOC: the VOC2012 folder with JPEGImages/ and SegmentationClassAug/;
#               COCO: the folder with train2014/ and SegmentationClass/train2014/.
# Extra flags for infer.py go in INFER_ARGS (e.g. INFER_ARGS="--num-workers 8"); NGPUS=2 runs two
# processes (torchrun); DEVICE=cpu runs on the CPU. Like the pipelines, every input is checked
# first (tools/preflight.py) and a rerun continues where it stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CHECKPOINT=${1:-${CHECKPOINT:-}}
DATASET_ROOT=${2:-${DATASET_ROOT:-}}
DATASET=${3:-${DATASET:-voc12}}
NGPUS=${NGPUS:-${NPROC:-1}}
NNODES=1 NODE_RANK=0
DEVICE=${DEVICE:-cuda}
INFER_ARGS=${INFER_ARGS:-}
DOWNLOAD_ROOT=${DOWNLOAD_ROOT:-$REPO}
positive_int NGPUS "$NGPUS"
ROWS=()

# evaluate CHECKPOINT DATASET_ROOT DATASET OUT_DIR: preflight, pseudo-masks, mIoU; appends one
# table row "| dataset | network | list | published mIoU | this run |" to ROWS.
evaluate() {
  local checkpoint=$1 root=$2 dataset=$3 out=$4 network head published
  # The published list, threshold and ground truth of the README's "Train(mIoU)" column (LIST:
  # any other id list, e.g. LIST=val).
  local list=${LIST:-$REPO/metadata/$dataset/train.txt}
  words X "$INFER_ARGS"
  local infer_cmd=("$REPO/infer.py" --dataset "$dataset" --infer_list "$list" --img_root "$root"
                   --weights "$checkpoint" --thr 0.20 --png-dir "$out/png" --cam-dir "$out/cam"
                   --vis-dir "$out/vis" --vis-num 20 --run-dir "$out/infer_run" --device "$DEVICE"
                   "${X[@]}")
  local eval_cmd=("$REPO/evaluate.py" --dataset "$dataset" --datalist "$list" --data-root "$root"
                  --pred_dir "$out/png" --save_path "$out/miou.txt" --overwrite)

  # 0. every input checked before anything is written (nothing is left behind on failure)
  "$PYTHON" "$REPO/tools/preflight.py" --title "released checkpoint $checkpoint on $dataset" \
    --device "$DEVICE" --procs "*=$NGPUS" "eval=1" -- \
    infer "${infer_cmd[@]}" ::: eval "${eval_cmd[@]}" || exit 2
  # Which network the file holds decides the published number to compare with (by its record,
  # else by its shapes: network/weights.py identify_checkpoint).
  read -r network head < <("$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); \
from data.registry import get_dataset; from network import network_parts; \
from network.weights import identify_checkpoint, load_state_dict_file; \
found = identify_checkpoint(load_state_dict_file(sys.argv[2]), get_dataset(sys.argv[3]).num_classes); \
print(found.network, network_parts(found.network)[1].name)" "$REPO" "$checkpoint" "$dataset") || exit 2
  published=$(published "$dataset" "$head")

  # 1. CAMs + pseudo-masks (resumable: rerunning skips finished images) -> $out/{png,cam,vis}
  say "pseudo-masks of $(basename "$list") with $network -> $out"
  launch "$NGPUS" "${infer_cmd[@]}"
  # 2. mIoU of the pseudo-masks against the GT -> $out/miou.txt (+ .json)
  "$PYTHON" "${eval_cmd[@]}"
  ROWS+=("| $dataset | $network | $(list_name "$list") | $published | $(miou_of "$out/miou.txt") |")
}

if [[ -n "$CHECKPOINT" ]]; then
  [[ -n "$DATASET_ROOT" ]] || \
    die "usage: script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR] (or no argument: every checkpoint of 'bash script/download.sh released')"
  [[ "$DATASET" == voc12 || "$DATASET" == coco ]] || die "DATASET must be voc12 or coco, got '$DATASET'"
  OUT_DIR=${4:-${OUT_DIR:-$REPO/results/released_$(basename "${CHECKPOINT%.*}")_${DATASET}}}
  evaluate "$CHECKPOINT" "$DATASET_ROOT" "$DATASET" "$OUT_DIR"
else
  # The released checkpoints and their data, where script/download.sh puts them (data/downloads.py).
  mapfile -t RELEASED < <("$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); \
from data.downloads import RELEASED, ROWS; \
[print(k[len('released_'):], ds, sys.argv[2] + '/' + ROWS[k].place[0].dest, sys.argv[2] + '/' + data) \
 for k, (ds, data) in RELEASED.items()]" "$REPO" "$DOWNLOAD_ROOT")
  found=0
  for line in "${RELEASED[@]}"; do
    read -r name dataset checkpoint root <<< "$line"
    [[ -f "$checkpoint" ]] && found=$((found + 1))
  done
  (( found > 0 )) || die "no released checkpoint in $DOWNLOAD_ROOT/weights: fetch them with 'bash script/download.sh released' (or pass CHECKPOINT DATASET_ROOT)"
  for line in "${RELEASED[@]}"; do
    read -r name dataset checkpoint root <<< "$line"
    head=${name#*_}
    if [[ ! -f "$checkpoint" ]]; then
      ROWS+=("| $dataset | resnet38_$head | - | $(published "$dataset" "$head") | not downloaded: bash script/download.sh released |")
    elif [[ ! -d "$root" ]]; then
      ROWS+=("| $dataset | resnet38_$head | - | $(published "$dataset" "$head") | no dataset at $root: bash script/download.sh $dataset |")
    else
      say "released checkpoint $name: $checkpoint on $root"
      evaluate "$checkpoint" "$root" "$dataset" "${OUT_DIR:-$REPO/results}/released_${name}_${dataset}"
    fi
  done
fi

# 3. ours next to the published numbers
echo
echo "| dataset | network | list | published mIoU | this run |"
echo "|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
