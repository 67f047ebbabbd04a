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
# fetches it. Every row is attempted: one whose check (preflight) or run fails is a row saying
# why, the others are still computed, and the exit status is then 1. Where the files come from: data/downloads.py (README "Downloads").
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
FAILED=0

# step WHAT CMD...: run one step of a row; when it fails, write "WHAT: <its last error line>" to
# $WHY (the row's cell says why; the step's whole message stays on the terminal above) and
# stop the row (evaluate runs in a subshell, see `row`).
step() {
  local what=$1 log rc=0 line
  shift
  log=$(mktemp)
  # stderr through tee (a copy for the reason), stdout as it is; with pipefail, rc is the step's
  { { "$@" 2>&1 1>&3 3>&-; } | tee "$log" >&2; } 3>&1 || rc=$?
  if (( rc != 0 )); then
    # the one-line error of the entry point ("infer.py: error: ..."); preflight's ends with ':'
    # and lists the problems below it, one per line: the first one goes with it
    line=$(grep -E '(^|: )error: ' "$log" | tail -n1 || true)
    [[ "$line" != *: ]] || line+=" $(grep -m1 -E '^  - ' "$log" | sed -E 's/^  - //' || true)"
    line=$(echo "${line:-exit status $rc}" | sed -E 's/^([A-Za-z_.]+: )?error: //; s/\|/\//g')
    echo "$what: $line" > "$WHY"
  fi
  rm -f "$log"
  return "$rc"
}

# evaluate CHECKPOINT DATASET_ROOT DATASET OUT_DIR: preflight, pseudo-masks, mIoU; writes one
# table row "| dataset | network | list | published mIoU | this run |" to $ROW.
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
  step "preflight" "$PYTHON" "$REPO/tools/preflight.py" --title "released checkpoint $checkpoint on $dataset" \
    --device "$DEVICE" --procs "*=$NGPUS" "eval=1" -- \
    infer "${infer_cmd[@]}" ::: eval "${eval_cmd[@]}"
  # Which network the file holds decides the published number to compare with (by its record,
  # else by its shapes: network/weights.py identify_checkpoint).
  step "checkpoint" "$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); \
from data.registry import get_dataset; from network import network_parts; \
from network.weights import identify_checkpoint, load_state_dict_file; from utils.errors import UserError
try: found = identify_checkpoint(load_state_dict_file(sys.argv[2]), get_dataset(sys.argv[3]).num_classes)
except UserError as e: sys.exit(f'error: {e}')
print(found.network, network_parts(found.network)[1].name, file=open(sys.argv[4], 'w'))" \
    "$REPO" "$checkpoint" "$dataset" "$ROW"
  read -r network head < "$ROW"
  published=$(published "$dataset" "$head")

  # 1. CAMs + pseudo-masks (resumable: rerunning skips finished images) -> $out/{png,cam,vis}
  say "pseudo-masks of $(basename "$list") with $network -> $out"
  step "infer.py" launch "$NGPUS" "${infer_cmd[@]}"
  # 2. mIoU of the pseudo-masks against the GT -> $out/miou.txt (+ .json)
  step "evaluate.py" "$PYTHON" "${eval_cmd[@]}"
  echo "| $dataset | $network | $(list_name "$list") | $published | $(miou_of "$out/miou.txt") |" > "$ROW"
}

# row NETWORK CHECKPOINT DATASET_ROOT DATASET OUT_DIR: evaluate in a subshell (errexit on: any
# failing command ends the row, never the script) and add its row to ROWS; a failed row says
# why in the table and counts in FAILED; ROW_RC is its exit status. NETWORK names the row until
# the checkpoint is identified. Call it as a plain command: inside `row || ...` bash would
# ignore the subshell's errexit.
row() {
  local name=$1 rc=0 why
  shift
  ROW=$(mktemp) WHY=$(mktemp)
  set +e
  ( set -e; evaluate "$@" )
  rc=$?
  set -e
  if (( rc == 0 )); then
    ROWS+=("$(cat "$ROW")")
  else
    FAILED=$((FAILED + 1))
    why=$(cat "$WHY")
    ROWS+=("| $3 | $name | - | $(published "$3" "${name#*_}") | failed: ${why:-exit status $rc, see above} |")
  fi
  rm -f "$ROW" "$WHY"
  ROW_RC=$rc
}

if [[ -n "$CHECKPOINT" ]]; then
  [[ -n "$DATASET_ROOT" ]] || \
    die "usage: script/eval_released.sh CHECKPOINT DATASET_ROOT [voc12|coco] [OUT_DIR] (or no argument: every checkpoint of 'bash script/download.sh released')"
  [[ "$DATASET" == voc12 || "$DATASET" == coco ]] || die "DATASET must be voc12 or coco, got '$DATASET'"
  OUT_DIR=${4:-${OUT_DIR:-$REPO/results/released_$(basename "${CHECKPOINT%.*}")_${DATASET}}}
  # one checkpoint: its refusal is the answer (exit 2, nothing written)
  row "$(basename "$CHECKPOINT")" "$CHECKPOINT" "$DATASET_ROOT" "$DATASET" "$OUT_DIR"
  (( ROW_RC == 0 )) || exit 2
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
  # Every row is attempted: a checkpoint or dataset that fails its check is a row saying why
  # (the exit status says that one failed), never the end of the table.
  for line in "${RELEASED[@]}"; do
    read -r name dataset checkpoint root <<< "$line"
    head=${name#*_}
    if [[ ! -f "$checkpoint" ]]; then
      ROWS+=("| $dataset | resnet38_$head | - | $(published "$dataset" "$head") | not downloaded: bash script/download.sh released |")
    elif [[ ! -d "$root" ]]; then
      ROWS+=("| $dataset | resnet38_$head | - | $(published "$dataset" "$head") | no dataset at $root: bash script/download.sh $dataset |")
    else
      say "released checkpoint $name: $checkpoint on $root"
      row "resnet38_$head" "$checkpoint" "$root" "$dataset" "${OUT_DIR:-$REPO/results}/released_${name}_${dataset}"
    fi
  done
fi

# 3. ours next to the published numbers
echo
echo "| dataset | network | list | published mIoU | this run |"
echo "|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if (( FAILED > 0 )); then
  echo "error: $FAILED of the checkpoints above could not be evaluated (the table says why)" >&2
  exit 1
fi
