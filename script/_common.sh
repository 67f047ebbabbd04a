# shellcheck shell=bash
# Helpers shared by script/{voc12,coco}_{cls,eps}.sh and script/demo.sh. Sourced, not run.
# Only sequencing lives here: every check and computation is a Python entry point.

# Name references (local -n) and empty arrays under `set -u` need bash 4.4 (macOS ships 3.2).
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  echo "error: these scripts need bash >= 4.4, this is $BASH_VERSION; install a newer bash (on macOS: brew install bash) and run them with it" >&2
  exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
# Without a passive wait policy, PyTorch on a few cores can run 40x slower next to another busy
# process (docs/pipelines.md); the scripts set it for every stage they start.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

die() { echo "error: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*"; }

# check_python: once, before anything else, that $PYTHON exists and finds the packages of
# requirements.txt (by their install, in ~0.1 s; importing torch would take seconds): run outside
# the project's environment, the first stage used to end in a traceback and a bash error.
check_python() {
  local missing
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    die "PYTHON=$PYTHON: no such interpreter; activate the project's environment (e.g. source .venv/bin/activate) or set PYTHON=/path/to/its/python"
  fi
  missing=$("$PYTHON" -c 'import importlib.util as u, sys
need = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow",
        "cv2": "opencv-python-headless", "imageio": "imageio", "tqdm": "tqdm",
        "matplotlib": "matplotlib"}
def found(mod):
    try:
        return u.find_spec(mod) is not None
    except Exception:  # e.g. a broken package or a blocked import
        return False
print(" ".join(pkg for mod, pkg in need.items() if not found(mod)))' 2>/dev/null) \
    || missing="(it does not start)"
  if [[ -n "$missing" ]]; then
    die "$PYTHON ($(command -v "$PYTHON")) lacks $missing of requirements.txt: activate the project's environment (e.g. source .venv/bin/activate) or install them with: $PYTHON -m pip install -r $REPO/requirements.txt"
  fi
}
check_python

# need_dir PATH HOW / need_file PATH HOW: stop at once when an input is missing.
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
# drop_stage NAME REASON: take a stage out of $STAGES, saying why (e.g. no ground truth to score).
drop_stage() {
  if want "$1"; then
    STAGES=$(echo " $STAGES " | sed "s/ $1 / /; s/^ *//; s/ *$//")
    say "skip $1: $2"
  fi
}

# positive_int NAME VALUE: a hardware variable must be a whole number >= 1 (NODE_RANK >= 0).
positive_int() { [[ "$2" =~ ^[0-9]+$ ]] && (( $2 >= ${3:-1} )) || die "$1=$2: expected a whole number >= ${3:-1}"; }

# launch PROCS SCRIPT ARGS...: one process, or PROCS processes per node with torchrun: on one
# machine (--standalone), or on NNODES machines that run the same script with their own
# NODE_RANK and a common MASTER_ADDR (static rendezvous; a node that arrives first waits up to
# RDZV_TIMEOUT seconds). The port is STAGE_PORT when set (run_stage gives every stage its own,
# so that a node that finished a stage early never joins the previous stage's rendezvous, still
# open on node 0), else MASTER_PORT. The entry points read the torchrun environment and split
# the work / the global batch themselves.
launch() (  # a subshell: the OMP_NUM_THREADS it may set stays with this stage
  local procs=$1; shift
  # torchrun sets OMP_NUM_THREADS=1 for every process when it is unset: right next to a GPU,
  # 1/16 of the machine for a CPU run. CPU processes share the cores instead.
  if [[ "${DEVICE:-}" == cpu && -z "${OMP_NUM_THREADS:-}" ]] && (( procs > 1 || NNODES > 1 )); then
    local cores; cores=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=$(( cores / procs > 1 ? cores / procs : 1 ))
  fi
  if (( NNODES > 1 )); then
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
      --nproc_per_node "$procs" --master_addr "$MASTER_ADDR" \
      --master_port "${STAGE_PORT:-$MASTER_PORT}" --rdzv_conf "timeout=$RDZV_TIMEOUT" "$@"
  elif (( procs > 1 )); then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$procs" "$@"
  else
    "$PYTHON" "$@"
  fi
)

# main_node: true on the node that runs the single-process stages (evaluation, the results table)
main_node() { (( NODE_RANK == 0 )); }

# resume_flag RUN_DIR: "--resume" when an unfinished run left checkpoint_last.pth (train.py and
# train_seg.py refuse to start over an existing run without it).
resume_flag() { if [[ -f "$1/checkpoint_last.pth" ]]; then echo "--resume"; fi; }

# words NAME STRING: split a flag string such as RESIZE="256 512" or TRAIN_ARGS into array NAME.
words() { read -r -a "$1" <<< "${2:-}"; }

# opt ARRAY FLAG VALUE: append FLAG VALUE to ARRAY only when VALUE is set, so that an unset
# variable leaves the entry point's default, i.e. the published recipe (data/registry.py).
opt() { local -n _arr=$1; if [[ -n "${3:-}" ]]; then _arr+=("$2" "$3"); fi; }

# recipe DATASET KEY... / published DATASET KEY...: recipe values / published mIoUs from the
# registry (data/registry.py), space-separated ("n/a" for a number that was never published).
recipe() {
  "$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); from data.registry import DATASETS; \
d = DATASETS[sys.argv[2]].train_defaults; print(*[d.get(k, '') for k in sys.argv[3:]])" "$REPO" "$@"
}
published() {
  "$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); from data.registry import DATASETS; \
d = DATASETS[sys.argv[2]].published_miou; print(*[d.get(k, 'n/a') for k in sys.argv[3:]])" "$REPO" "$@"
}

# list_name LIST: "train" for both "train" and "metadata/voc12/train.txt".
list_name() { local b; b=$(basename "$1"); echo "${b%.txt}"; }

# miou_of TABLE: the mIoU of an evaluate.py text table (its "-  mean" row), or "-".
miou_of() {
  local v=""
  [[ -f "$1" ]] && v=$(awk '$2 == "mean" {print $3; exit}' "$1")
  echo "${v:--}"
}

# why_empty TABLE: why an evaluate.py table is missing: the note infer_seg.py leaves beside it
# (<pred>_eval.skipped.txt, e.g. no ground truth), or that its stage did not run.
why_empty() {
  local note=${1%.txt}.skipped.txt
  if [[ -f "$note" ]]; then head -n 1 "$note"; else echo "not computed: its stage did not run"; fi
}

# result_row LABEL LIST PUBLISHED TABLE: one markdown row "label | list | published | this run";
# an empty cell says why.
result_row() {
  local v; v=$(miou_of "$4")
  if [[ "$v" == - ]]; then v="- ($(why_empty "$4"))"; fi
  echo "| $1 | $(list_name "$2") | $3 | $v |"
}
