# shellcheck shell=bash
# The pipeline shared by script/{voc12,coco}_{cls,eps}.sh. Sourced after _common.sh and after the
# calling script has set what it runs (DATASET, NETWORK, SESSION, STAGES, the input paths).
#
# The recipe is NOT here: an empty variable (CROP, BATCH, TAU, SEG_ITERS, ...) is not passed, so
# the entry point applies the published value from data/registry.py (classifier, lists) or
# train_seg.py (DeepLab). Set a variable to override it.
#
# Order of work:
#   1. build the exact command line of every stage;
#   2. decide which stages run (a stage whose outputs are complete and current is skipped);
#   3. tools/preflight.py checks them all (flags, recipe, every input file) in seconds, chooses
#      each training stage's process layout on NGPUS x NNODES (utils/layout.py: the published
#      effective batch kept exactly) and prints the plan, or lists every problem and stops;
#      CHECK_ONLY=1 stops here;
#   4. run them; 5. print the results next to the published numbers.

# Hardware and pass-through settings, read from the environment.
set_hardware() {
  NGPUS=${NGPUS:-1}               # processes per node (GPUs with DEVICE=cuda)
  NNODES=${NNODES:-1}             # machines; each runs this script with its own NODE_RANK
  NODE_RANK=${NODE_RANK:-0}
  MASTER_PORT=${MASTER_PORT:-29500}   # stage k of a multi-node run uses MASTER_PORT + k
  RDZV_TIMEOUT=${RDZV_TIMEOUT:-3600}  # s a node waits for the others at each stage's start
  # Each training stage picks its own processes per node (at most NGPUS) so that its published
  # effective batch is kept exactly (utils/layout.py); these fix them instead
  CLS_NGPUS=${CLS_NGPUS:-}        # classifier (train)
  SEG_NGPUS=${SEG_NGPUS:-}        # DeepLab (seg)
  DEVICE=${DEVICE:-cuda}          # cpu: NGPUS CPU processes (gloo); cuda never falls back to cpu
  NUM_WORKERS=${NUM_WORKERS:-8}
  CHECK_ONLY=${CHECK_ONLY:-0}
  positive_int NGPUS "$NGPUS"; positive_int NNODES "$NNODES"
  if [[ -n "$CLS_NGPUS" ]]; then positive_int CLS_NGPUS "$CLS_NGPUS"; fi
  if [[ -n "$SEG_NGPUS" ]]; then positive_int SEG_NGPUS "$SEG_NGPUS"; fi
  positive_int NODE_RANK "$NODE_RANK" 0; positive_int NUM_WORKERS "$NUM_WORKERS" 0
  positive_int MASTER_PORT "$MASTER_PORT"
  if (( NNODES > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
    die "NNODES=$NNODES needs MASTER_ADDR, the address of the NODE_RANK=0 machine, the same on every node (docs/pipelines.md 'Several machines')"
  fi
  (( MASTER_PORT <= 65530 )) || die "MASTER_PORT=$MASTER_PORT: the stages use MASTER_PORT..MASTER_PORT+5, keep it <= 65530"
  (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
  [[ "$DEVICE" == cpu || "$DEVICE" == cuda || "$DEVICE" == auto ]] || die "DEVICE=$DEVICE: cpu, cuda or auto"
}

# The lists and file names the outputs are named after (the registry's when not overridden).
set_paths() {
  local defaults line
  line=$(recipe "$DATASET" infer_list seg_list seg_eval_list) && [[ -n "$line" ]] \
    || die "could not read the $DATASET recipe from data/registry.py with $PYTHON (see the message above)"
  read -r -a defaults <<< "$line"
  INFER_LIST=${INFER_LIST:-${defaults[0]}}
  SEG_LIST=${SEG_LIST:-${defaults[1]}}
  SEG_EVAL_LIST=${SEG_EVAL_LIST:-${defaults[2]}}
  SAL_LIST=${TRAIN_LIST:-$(recipe "$DATASET" train_list)}  # the saliency stage: EPS's training list
  RUN_DIR=$SAVE_ROOT/$SESSION
  CKPT=$RUN_DIR/checkpoint_cls.pth
  RESULT=$RUN_DIR/result
  EVAL_TXT=$RESULT/$(list_name "$INFER_LIST")_miou.txt
  SEG_DIR=$RUN_DIR/deeplab
  SEG_PRED=$SEG_DIR/$(list_name "$SEG_EVAL_LIST")
  SEG_CRF=${SEG_CRF:-0}
}

# current STAGE RECORD...: true when every provenance record (utils/provenance.py) still matches
# the files it was made from; else says why the stage's outputs are stale (they are then not
# counted as done: the stage runs, or preflight names the fix)
current() {
  local s=$1 r why; shift
  for r in "$@"; do
    if ! why=$("$PYTHON" "$REPO/utils/provenance.py" check "$r"); then
      say "$s: outputs are stale: $why"
      return 1
    fi
  done
}

# 2. which stages run. Outputs count as done only when their recorded inputs are the current
# ones (weights retrained under the same name are not); a stale evaluation is recomputed
# (--overwrite added), a stale prediction folder or DeepLab run is named by preflight with the fix
plan_stages() {
  RUN=()
  local s
  for s in $STAGES; do
    case $s in
      saliency) if [[ "$(saliency_todo)" == 0 ]]; then
                  say "skip saliency: every map of $(list_name "$SAL_LIST") is in ${SALIENCY_ROOT:-the SALImages folder}"; continue; fi ;;
      train) if [[ -f "$CKPT" ]]; then skip train "$CKPT"; continue; fi ;;
      eval) if ! main_node; then continue; fi
            if [[ -f "$EVAL_TXT" ]]; then
              if current eval "${EVAL_TXT%.txt}.json"; then skip eval "$EVAL_TXT"; continue; fi
              EVAL_CMD+=(--overwrite)  # the old score is of pseudo-masks changed since
            fi ;;
      seg) if [[ -f "$SEG_DIR/checkpoint_final.pth" ]] && current seg "$SEG_DIR/inputs.json"; then
             skip seg "$SEG_DIR/checkpoint_final.pth"; continue; fi ;;
      segeval) if [[ -f "${SEG_PRED}_eval.txt" && ( "$SEG_CRF" != 1 || -f "${SEG_PRED}_crf_eval.txt" ) ]] &&
                  current segeval "$SEG_PRED/.infer_settings.json" "${SEG_PRED}_eval.json"; then
                 skip segeval "${SEG_PRED}_eval.txt"; continue; fi ;;
    esac
    RUN+=("$s")
  done
}

# saliency_todo: how many saliency maps of the training list are missing ("" when it cannot tell;
# the preflight then says why)
saliency_todo() {
  stage_cmd saliency
  "$PYTHON" "${CMD[@]}" --dry-run --no-progress 2>/dev/null | awk '/maps to make/ {print $1; exit}' || true
}

# 1. the command line of every stage
build_commands() {
  local meta=() x=()
  if [[ -n "${METADATA_DIR:-}" ]]; then meta=(--metadata-dir "$METADATA_DIR"); fi
  local common=(--dataset "$DATASET" "${meta[@]}" --device "$DEVICE")

  # saliency maps for the training list (tools/make_saliency.py); its own --device choice, since
  # onnxruntime's CUDA provider is a separate install (onnxruntime-gpu)
  SAL_CMD=("$REPO/tools/make_saliency.py" --dataset "$DATASET" "${meta[@]}" --data-root "$DATASET_ROOT"
           --list "$SAL_LIST" --model "${SAL_MODEL:-u2net}" --device "${SAL_DEVICE:-auto}")
  opt SAL_CMD --out "${SALIENCY_ROOT:-}"
  opt SAL_CMD --model-path "${SAL_MODEL_PATH:-}"
  words x "${SAL_ARGS:-}"; SAL_CMD+=("${x[@]}")

  # shellcheck disable=SC2207
  TRAIN_CMD=("$REPO/train.py" "${common[@]}" --network "$NETWORK" --session "$SESSION"
             --save_root "$SAVE_ROOT" --data_root "$DATASET_ROOT" --weights "$WEIGHTS"
             --num_workers "$NUM_WORKERS" $(resume_flag "$RUN_DIR"))
  opt TRAIN_CMD --saliency_root "${SALIENCY_ROOT:-}"
  opt TRAIN_CMD --train_list "${TRAIN_LIST:-}"
  opt TRAIN_CMD --crop_size "${CROP:-}"
  if [[ -n "${RESIZE:-}" ]]; then words x "$RESIZE"; TRAIN_CMD+=(--resize_size "${x[@]}"); fi
  opt TRAIN_CMD --max_iters "${MAX_ITERS:-}"
  opt TRAIN_CMD --batch_size "${BATCH:-}"
  opt TRAIN_CMD --iter-size "${ITER_SIZE:-}"
  opt TRAIN_CMD --lr "${LR:-}"
  opt TRAIN_CMD --wt_dec "${WT_DEC:-}"
  opt TRAIN_CMD --tau "${TAU:-}"
  opt TRAIN_CMD --lam "${LAM:-}"
  words x "${TRAIN_ARGS:-}"; TRAIN_CMD+=("${x[@]}")

  INFER_CMD=("$REPO/infer.py" "${common[@]}" --infer_list "$INFER_LIST" --img_root "$DATASET_ROOT"
             --weights "$CKPT" --png-dir "$RESULT/png" --run-dir "$RESULT/infer_run"
             --num-workers "$NUM_WORKERS")
  opt INFER_CMD --thr "${THR:-}"
  if [[ "${SAVE_CAMS:-0}" == 1 ]]; then INFER_CMD+=(--cam-dir "$RESULT/cam"); fi
  words x "${INFER_ARGS:-}"
  # the same on the DeepLab training list, without overlays
  PSEUDO_CMD=("$REPO/infer.py" "${common[@]}" --infer_list "$SEG_LIST" --img_root "$DATASET_ROOT"
              --weights "$CKPT" --png-dir "$RESULT/png" --run-dir "$RESULT/infer_run"
              --num-workers "$NUM_WORKERS")
  opt PSEUDO_CMD --thr "${THR:-}"
  PSEUDO_CMD+=("${x[@]}")
  INFER_CMD+=(--vis-dir "$RESULT/vis")
  opt INFER_CMD --vis-num "${VIS_NUM:-}"
  INFER_CMD+=("${x[@]}")

  EVAL_CMD=("$REPO/evaluate.py" --dataset "$DATASET" "${meta[@]}" --datalist "$INFER_LIST"
            --data-root "$DATASET_ROOT" --pred_dir "$RESULT/png" --save_path "$EVAL_TXT")
  opt EVAL_CMD --gt_dir "${GT_DIR:-}"
  words x "${EVAL_ARGS:-}"; EVAL_CMD+=("${x[@]}")

  SEG_CMD=("$REPO/train_seg.py" "${common[@]}" --data_root "$DATASET_ROOT" --mask-dir "$RESULT/png"
           --train_list "$SEG_LIST" --init "$SEG_INIT" --num-workers "$NUM_WORKERS"
           --run-dir "$SEG_DIR")
  if [[ -f "$SEG_DIR/checkpoint_last.pth" ]]; then SEG_CMD+=(--resume); fi
  opt SEG_CMD --arch "${SEG_ARCH:-}"
  opt SEG_CMD --max-iters "${SEG_ITERS:-}"
  opt SEG_CMD --batch-size "${SEG_BATCH:-}"
  opt SEG_CMD --iter-size "${SEG_ITER_SIZE:-}"
  opt SEG_CMD --crop-size "${SEG_CROP:-}"
  opt SEG_CMD --lr "${SEG_LR:-}"
  words x "${SEG_ARGS:-}"; SEG_CMD+=("${x[@]}")

  SEGEVAL_CMD=("$REPO/infer_seg.py" "${common[@]}" --data_root "$DATASET_ROOT"
               --list "$SEG_EVAL_LIST" --weights "$SEG_DIR/checkpoint_final.pth"
               --out-dir "$SEG_PRED" --num-workers "$NUM_WORKERS")
  # SEG_EVALUATE=0 (a dataset without ground truth): DeepLab's predictions, not scored
  if [[ "${SEG_EVALUATE:-1}" != 0 ]]; then SEGEVAL_CMD+=(--evaluate); else SEGEVAL_CMD+=(--no-evaluate); fi
  if [[ "$SEG_CRF" == 1 ]]; then SEGEVAL_CMD+=(--crf --crf-workers "${SEG_CRF_WORKERS:-$(( NUM_WORKERS == 0 ? 0 : NUM_WORKERS / NGPUS > 1 ? NUM_WORKERS / NGPUS : 1 ))}"); fi
  opt SEGEVAL_CMD --gt_dir "${SEG_GT_DIR:-}"
  words x "${SEGINFER_ARGS:-}"; SEGEVAL_CMD+=("${x[@]}")
}

# The command array of a stage, by name.
stage_cmd() {
  case $1 in
    saliency) CMD=("${SAL_CMD[@]}") ;;
    train) CMD=("${TRAIN_CMD[@]}") ;; infer) CMD=("${INFER_CMD[@]}") ;;
    eval) CMD=("${EVAL_CMD[@]}") ;; pseudo) CMD=("${PSEUDO_CMD[@]}") ;;
    seg) CMD=("${SEG_CMD[@]}") ;; segeval) CMD=("${SEGEVAL_CMD[@]}") ;;
  esac
}

# 3. preflight: every stage that will run, checked at once; it also chooses the processes per
# node of each stage (PROCS), which every node computes alike
declare -A PROCS=()
run_preflight() {
  local args=() s n fixed=()
  for s in "${RUN[@]}"; do stage_cmd "$s"; args+=("$s" "${CMD[@]}" ":::"); done
  if [[ -n "$CLS_NGPUS" ]]; then fixed+=("train=$CLS_NGPUS"); fi
  if [[ -n "$SEG_NGPUS" ]]; then fixed+=("seg=$SEG_NGPUS"); fi
  local title="$SESSION: ${NNODES} node(s) x ${NGPUS} process(es) on $DEVICE (node $NODE_RANK)"
  local layouts; layouts=$(mktemp) || die "mktemp failed"
  "$PYTHON" "$REPO/tools/preflight.py" --title "$title" --nodes "$NNODES" --device "$DEVICE" \
    --procs "*=$NGPUS" "${fixed[@]}" --layout-out "$layouts" -- "${args[@]}" || { rm -f "$layouts"; exit 2; }
  while read -r s n; do PROCS[$s]=$n; done < "$layouts"
  rm -f "$layouts"
}

# 4. one stage, on its own rendezvous port: every node computes the same port for a stage
# whatever it skipped, and a node that finished a stage early cannot join the previous one
stage_port() {
  local i=0 s
  for s in train infer eval pseudo seg segeval; do
    if [[ $s == "$1" ]]; then echo $(( MASTER_PORT + i )); return; fi
    i=$(( i + 1 ))
  done
}
run_stage() {
  local s=$1
  stage_cmd "$s"
  say "$s: ${CMD[*]}"
  case $s in
    eval) "$PYTHON" "${CMD[@]}" ;;
    saliency) if main_node; then "$PYTHON" "${CMD[@]}"; else wait_for_saliency; fi ;;
    *) STAGE_PORT=$(stage_port "$s") launch "${PROCS[$s]:-$NGPUS}" "${CMD[@]}" ;;
  esac
}

# The saliency stage runs on node 0 only; the other nodes wait for its maps (up to RDZV_TIMEOUT
# seconds without a new map) before their first torchrun stage.
wait_for_saliency() {
  local last="" now waited=0
  while now=$(saliency_todo) && [[ "$now" != 0 ]]; do
    if [[ "$now" != "$last" ]]; then last=$now; waited=0; say "waiting for node 0's saliency maps: ${now:-?} to go"; fi
    (( waited < RDZV_TIMEOUT )) || die "no new saliency map from node 0 for ${RDZV_TIMEOUT} s; check its log"
    sleep 10; waited=$(( waited + 10 ))
  done
}

# A script may define adjust_stages (called after the paths are set, before the plan) to drop
# stages its dataset cannot run, with drop_stage NAME REASON (script/custom_eps.sh).
run_pipeline() {
  select_stages ${PIPELINE_STAGES:-train infer eval pseudo seg segeval}
  set_hardware
  set_paths
  if declare -F adjust_stages > /dev/null; then adjust_stages; fi
  build_commands
  plan_stages
  if (( ${#RUN[@]} )); then run_preflight; fi
  if [[ "$CHECK_ONLY" == 1 ]]; then say "CHECK_ONLY=1: nothing was run"; return; fi
  local s
  for s in "${RUN[@]}"; do run_stage "$s"; done
  if main_node; then print_results; fi
}

# 5. the results next to the published numbers (data/registry.py)
print_results() {
  local head=${NETWORK##*_}  # networks are named <backbone>_<head> (network/registry.py)
  local pub_pseudo pub_seg
  read -r pub_pseudo pub_seg <<< "$(published "$DATASET" "$head" "deeplab_$head")"
  echo
  echo "| $SESSION | list | published mIoU | this run |"
  echo "|---|---|---|---|"
  result_row "pseudo-masks (thr ${THR:-0.20}, no CRF)" "$INFER_LIST" "$pub_pseudo" "$EVAL_TXT"
  if want seg || want segeval || [[ -f "${SEG_PRED}_eval.txt" ]]; then
    result_row "DeepLab-v2" "$SEG_EVAL_LIST" "$pub_seg" "${SEG_PRED}_eval.txt"
    if [[ "$SEG_CRF" == 1 ]]; then
      result_row "DeepLab-v2 + CRF" "$SEG_EVAL_LIST" "$pub_seg" "${SEG_PRED}_crf_eval.txt"
    fi
    init_row "$SEG_DIR/inputs.json"
  fi
}

# init_row RECORD: the DeepLab init file the numbers above come from (train_seg.py's inputs.json):
# name, size and sha256, so that a table always says which init made it (docs/segmentation.md)
init_row() {
  [[ -f "$1" ]] || return 0
  "$PYTHON" -c 'import json, sys
init = json.load(open(sys.argv[1])).get("init")
print("| DeepLab-v2 init | %s | - | %s bytes, sha256 %s |" % (init["name"], init["size"], init["sha256"][:16])
      if init else "| DeepLab-v2 init | none | - | random weights (--init none) |")' "$1"
}
