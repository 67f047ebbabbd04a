#!/usr/bin/env bash
# The built-in demo, "railroad is not a train": the whole method on a synthetic dataset, on CPU,
# in a few minutes (no download, no GPU).
#
#   bash script/demo.sh                  # outputs in demo_runs/, the dataset in demo_data/
#
# Every "train" in the toy dataset stands on a railroad and every "boat" floats on water; both
# context regions are background in the ground truth and not salient. The CAM baseline learns the
# context as evidence and labels it as the object; EPS, trained with the (imperfect) saliency
# maps, keeps the masks on the objects. Stages (STAGES, in this order):
#   data     make the dataset (tools/make_demo_dataset.py) unless it exists
#   train    the CAM baseline (small_cls) and EPS (small_eps), from scratch
#   infer    pseudo-masks on train, with overlays
#   eval     their mIoU against the ground truth
#   seg      a small DeepLab-v2 (deeplabv2_small) on the EPS pseudo-masks, scored on val
#   report   side-by-side table (mIoU, per-class IoU, context pixels labelled as the object)
#            and a comparison figure
# The baseline and EPS chains run side by side (JOBS=2, one thread each); JOBS=1 runs them one
# after the other. Rerunning skips what is done.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# ---- dataset -----------------------------------------------------------------------------------
DEMO_DATA=${DEMO_DATA:-$REPO/demo_data}
NUM_TRAIN=${NUM_TRAIN:-1500}
NUM_VAL=${NUM_VAL:-300}
SIZE=${SIZE:-96}
DATA_SEED=${DATA_SEED:-0}
# ---- outputs -----------------------------------------------------------------------------------
OUT=${OUT:-$REPO/demo_runs}
# ---- classifiers (both from scratch; the same recipe for the baseline and EPS) -----------------
MAX_ITERS=${MAX_ITERS:-1000}
BATCH=${BATCH:-16}
CROP=${CROP:-96}
RESIZE=${RESIZE:-80 120}
LR=${LR:-0.1}
TAU=${TAU:-0.4}
LAM=${LAM:-0.5}
SEED=${SEED:-0}
# ---- pseudo-masks ------------------------------------------------------------------------------
THR=${THR:-0.20}
VIS_NUM=${VIS_NUM:-8}
# ---- segmentation ------------------------------------------------------------------------------
SEG_ITERS=${SEG_ITERS:-300}
SEG_BATCH=${SEG_BATCH:-8}
SEG_CROP=${SEG_CROP:-96}
SEG_LR=${SEG_LR:-3e-3}
# ---- hardware ----------------------------------------------------------------------------------
DEVICE=${DEVICE:-cpu}         # the numbers in the README are CPU numbers
JOBS=${JOBS:-2}               # 2: baseline and EPS side by side; 1: one after the other
TICK=${TICK:-15}              # seconds between the progress lines on the terminal
THREADS=${THREADS:-1}         # threads per chain: the small nets run faster on 1 than on 2, and a
                              # fixed count keeps the numbers identical between JOBS=1 and 2
STAGES=${STAGES:-data train infer eval seg report}

select_stages data train infer eval seg report
T0=$SECONDS
words RESIZE_A "$RESIZE"
META=(--dataset custom --metadata-dir "$DEMO_DATA")
mkdir -p "$OUT"

# ---- 0. the dataset ----------------------------------------------------------------------------
if want data; then
  if [[ -f "$DEMO_DATA/dataset_info.json" ]]; then skip data "$DEMO_DATA/dataset_info.json"; else
    say "making the demo dataset ($NUM_TRAIN train + $NUM_VAL val images, ${SIZE}px) -> $DEMO_DATA"
    "$PYTHON" "$REPO/tools/make_demo_dataset.py" --out "$DEMO_DATA" --num-train "$NUM_TRAIN" \
      --num-val "$NUM_VAL" --size "$SIZE" --seed "$DATA_SEED"
  fi
fi
# -> $DEMO_DATA/{JPEGImages,SegmentationClassAug,SALImages,ContextMasks}/, labels.txt,
#    image_labels.txt, context.txt, train.txt, val.txt
need_dir "$DEMO_DATA/JPEGImages" "Make the demo dataset first: add 'data' to STAGES."

# chain NAME NETWORK SEG [TRAIN FLAGS...]: stages 1-4 of one method (SEG=1: also the DeepLab
# stage). Its Python output goes to $OUT/NAME.log; the one-line stage messages go to fd 3 (the
# terminal), and the ticker below shows its latest progress line there.
note() { say "$*" >&3; }
chain() {
  local name=$1 network=$2 with_seg=$3 run=$OUT/$1
  local ckpt=$run/checkpoint_cls.pth
  local sal=("${@:4}")
  # ---- 1. train ----
  if want train; then
    if [[ -f "$ckpt" ]]; then skip "$name train" "$ckpt" >&3; else
      note "$name: training $network ($MAX_ITERS iterations)"
      # shellcheck disable=SC2046
      "$PYTHON" "$REPO/train.py" "${META[@]}" --data_root "$DEMO_DATA" --network "$network" \
        --weights none "${sal[@]}" --train_list train --crop_size "$CROP" \
        --resize_size "${RESIZE_A[@]}" --batch_size "$BATCH" --max_iters "$MAX_ITERS" --lr "$LR" \
        --num_workers 0 --seed "$SEED" --device "$DEVICE" --save_root "$OUT" --session "$name" \
        $(resume_flag "$run")
    fi
  fi
  # -> $run/checkpoint_cls.pth, log.txt, metrics.jsonl, loss.png
  # ---- 2. pseudo-masks on train (infer.py skips images already done) ----
  if want infer; then
    need_file "$ckpt" "It is the train stage's output: add 'train' to STAGES."
    note "$name: pseudo-masks on train"
    "$PYTHON" "$REPO/infer.py" "${META[@]}" --img_root "$DEMO_DATA" --infer_list train \
      --weights "$ckpt" --thr "$THR" --png-dir "$run/result/png" --vis-dir "$run/result/vis" \
      --vis-num "$VIS_NUM" --run-dir "$run/result/infer_run" --num-workers 0 --device "$DEVICE"
  fi
  # -> $run/result/png/<id>.png, $run/result/vis/<id>.png (image, mask, CAM of each class)
  # ---- 3. mIoU of the pseudo-masks ----
  if want eval; then
    if [[ -f "$run/result/train_miou.txt" ]]; then
      skip "$name eval" "$run/result/train_miou.txt" >&3
    else
      "$PYTHON" "$REPO/evaluate.py" "${META[@]}" --datalist train \
        --gt_dir "$DEMO_DATA/SegmentationClassAug" --pred_dir "$run/result/png" \
        --save_path "$run/result/train_miou.txt" --num-workers 0 --no-progress
    fi
    note "$name: pseudo-mask mIoU $(miou_of "$run/result/train_miou.txt") (train)"
  fi
  # -> $run/result/train_miou.txt (+ .json)
  # ---- 4. small DeepLab-v2 on the EPS pseudo-masks, scored on val ----
  if want seg && [[ "$with_seg" == 1 ]]; then
    if [[ -f "$run/deeplab/checkpoint_final.pth" ]]; then
      skip "$name seg" "$run/deeplab/checkpoint_final.pth" >&3
    else
      note "$name: training deeplabv2_small on the pseudo-masks ($SEG_ITERS iterations)"
      # shellcheck disable=SC2046
      "$PYTHON" "$REPO/train_seg.py" "${META[@]}" --data_root "$DEMO_DATA" \
        --mask-dir "$run/result/png" --train_list train --arch deeplabv2_small --init none \
        --max-iters "$SEG_ITERS" --batch-size "$SEG_BATCH" --iter-size 1 --crop-size "$SEG_CROP" \
        --lr "$SEG_LR" --num-workers 0 --seed "$SEED" --device "$DEVICE" --run-dir "$run/deeplab" \
        $(resume_flag "$run/deeplab")
    fi
    if [[ ! -f "$run/deeplab/val_eval.txt" ]]; then
      "$PYTHON" "$REPO/infer_seg.py" "${META[@]}" --data_root "$DEMO_DATA" --list val \
        --weights "$run/deeplab/checkpoint_final.pth" --out-dir "$run/deeplab/val" --evaluate \
        --num-workers 0 --device "$DEVICE"
    fi
    note "$name: DeepLab val mIoU $(miou_of "$run/deeplab/val_eval.txt")"
  fi
  # -> $run/deeplab/checkpoint_final.pth, $run/deeplab/val/<id>.png, $run/deeplab/val_eval.txt
}

# start NAME NETWORK SEG [FLAGS...]: the chain with its output in $OUT/NAME.log. Always started
# in the background (a subshell, where set -e stops it at its first error) and collected with
# wait; a marker file, removed when the subshell exits, tells the ticker that it runs.
start() {
  touch "$OUT/.$1.running"
  trap "rm -f '$OUT/.$1.running'" EXIT
  OMP_NUM_THREADS=$THREADS chain "$@" 3>&1 >>"$OUT/$1.log" 2>&1
}
# ticker: every TICK seconds, one line per running chain on the terminal: the latest progress
# line of its log (the step it is on, with its iteration, loss and ETA; utils/progress.py), so a
# run of several minutes never looks hung. The log files themselves hold plain lines.
ticker() {
  local name line
  while sleep "$TICK"; do
    for name in baseline eps; do
      [[ -f "$OUT/.$name.running" && -f "$OUT/$name.log" ]] || continue
      line=$(grep -a -E ' ETA |mIoU' "$OUT/$name.log" | tail -n 1 |
             sed -E 's/^[0-9-]+ [0-9:]+ (INFO|WARNING) [A-Za-z_.]+: //' || true)
      say "$name | ${line:-starting}"
    done
  done
}
EPS_FLAGS=(--saliency_root "$DEMO_DATA/SALImages" --tau "$TAU" --lam "$LAM")
if want train || want infer || want eval || want seg; then
  rc=0
  ticker & tick_pid=$!
  trap 'kill "$tick_pid" 2>/dev/null || true' EXIT
  if (( JOBS > 1 )); then
    start baseline small_cls 0 & pid_base=$!
    start eps small_eps 1 "${EPS_FLAGS[@]}" & pid_eps=$!
    wait "$pid_base" || rc=$?
    wait "$pid_eps" || rc=$?
  else
    start baseline small_cls 0 & wait $! || rc=$?
    if (( rc == 0 )); then start eps small_eps 1 "${EPS_FLAGS[@]}" & wait $! || rc=$?; fi
  fi
  kill "$tick_pid" 2>/dev/null || true
  (( rc == 0 )) || die "a stage failed: see the end of $OUT/baseline.log and $OUT/eps.log"
fi

# ---- 5. the report -----------------------------------------------------------------------------
if want report; then
  SEG=()
  if [[ -f "$OUT/eps/deeplab/val_eval.txt" ]]; then SEG=(--seg "EPS=$OUT/eps/deeplab/val"); fi
  echo
  "$PYTHON" "$REPO/tools/demo_report.py" --data-root "$DEMO_DATA" --list train \
    --method "CAM baseline=$OUT/baseline/result/png" --method "EPS=$OUT/eps/result/png" \
    "${SEG[@]}" --out "$OUT/report.md" --figure "$OUT/compare.png"
fi
# -> $OUT/report.md (the table above), $OUT/compare.png (image | GT | baseline | EPS)
say "done in $(( SECONDS - T0 )) s. Overlays: $OUT/{baseline,eps}/result/vis/; figure: $OUT/compare.png"
