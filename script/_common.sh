# shellcheck shell=bash
# Helpers shared by script/{voc12,coco}_{cls,eps}.sh and script/demo.sh. Sourced, not run.
# Only checks and sequencing live here; every computation is a Python entry point.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

die() { echo "error: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*"; }

# need_dir PATH HOW / need_file PATH HOW: stop at once when an input is missing; HOW says what to
# download and where to put it.
need_dir() { [[ -d "$1" ]] || die "$1: folder not found. $2"; }
need_file() { [[ -f "$1" ]] || die "$1: file not found. $2"; }

# select_stages KNOWN...: validate $STAGES (space-separated, a subset of KNOWN); SKIP_SEG=1 drops
# the segmentation stages (pseudo seg segeval).
select_stages() {
  local known=" $* " s kept=""
  for s in $STAGES; do
    [[ "$known" == *" $s "* ]] || die "unknown stage '$s' in STAGES='$STAGES'; known stages: $*"
    if [[ "${SKIP_SEG:-0}" == 1 && " pseudo seg segeval " == *" $s "* ]]; then continue; fi
    kept+="$s "
  done
  STAGES=${kept% }
  say "stages: ${STAGES:-none}"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }
skip() { say "skip $1: $2 exists"; }

# launch SCRIPT ARGS...: one process, or torchrun over NGPUS processes (the entry points read the
# torchrun environment and split the work / the global batch themselves).
launch() {
  if (( NGPUS > 1 )); then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPUS" "$@"
  else
    "$PYTHON" "$@"
  fi
}

# resume_flag RUN_DIR: "--resume" when an unfinished run left checkpoint_last.pth (train.py and
# train_seg.py refuse to start over an existing run without it).
resume_flag() { if [[ -f "$1/checkpoint_last.pth" ]]; then echo "--resume"; fi; }

# words NAME STRING: split a flag string such as RESIZE="256 512" or TRAIN_ARGS into array NAME.
words() { read -r -a "$1" <<< "${2:-}"; }

# list_name LIST: "train" for both "train" and "metadata/voc12/train.txt".
list_name() { local b; b=$(basename "$1"); echo "${b%.txt}"; }

# miou_of TABLE: the mIoU of an evaluate.py text table (its "-  mean" row), or "-".
miou_of() {
  local v=""
  [[ -f "$1" ]] && v=$(awk '$2 == "mean" {print $3; exit}' "$1")
  echo "${v:--}"
}

# result_row LABEL LIST PUBLISHED TABLE: one markdown row "label | list | published | this run".
result_row() { echo "| $1 | $(list_name "$2") | $3 | $(miou_of "$4") |"; }
