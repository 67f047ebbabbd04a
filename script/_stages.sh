# shellcheck shell=bash
# The pipeline stages shared by script/{voc12,coco}_{cls,eps}.sh. Sourced after _common.sh and
# after the calling script has set its variables (paths, recipe, STAGES); each script keeps its
# own input checks and calls the stages in order, with a comment saying where outputs land.
# Only sequencing lives here: every computation is a Python entry point.

# prepare_run: derive the output paths and flag arrays from the script's variables.
# METHOD_ARGS (set by the script) holds the head-specific train.py flags, e.g. the saliency
# root, tau and lambda for EPS; empty for the CAM baseline.
prepare_run() {
  select_stages train infer eval pseudo seg segeval
  RUN_DIR=$SAVE_ROOT/$SESSION
  CKPT=$RUN_DIR/checkpoint_cls.pth
  RESULT=$RUN_DIR/result
  EVAL_TXT=$RESULT/$(list_name "$INFER_LIST")_miou.txt
  SEG_DIR=$RUN_DIR/deeplab
  SEG_PRED=$SEG_DIR/$(list_name "$SEG_EVAL_LIST")
  words RESIZE_A "$RESIZE"
  words TRAIN_X "$TRAIN_ARGS"; words INFER_X "$INFER_ARGS"; words EVAL_X "$EVAL_ARGS"
  words SEG_X "$SEG_ARGS"; words SEGINFER_X "$SEGINFER_ARGS"
  META=(); if [[ -n "$METADATA_DIR" ]]; then META=(--metadata-dir "$METADATA_DIR"); fi
  CAMS=(); if [[ "$SAVE_CAMS" == 1 ]]; then CAMS=(--cam-dir "$RESULT/cam"); fi
  CRF=(); if [[ "$SEG_CRF" == 1 ]]; then CRF=(--crf --crf-workers "$SEG_CRF_WORKERS"); fi
}

# 1. the classifier; skipped once checkpoint_cls.pth exists, resumed when a run was interrupted.
stage_train() {
  if [[ -f "$CKPT" ]]; then skip train "$CKPT"; return; fi
  say "train $NETWORK on $TRAIN_LIST -> $RUN_DIR"
  # shellcheck disable=SC2046  # resume_flag prints nothing or one word
  launch "$REPO/train.py" --dataset "$DATASET" "${META[@]}" --network "$NETWORK" \
    --session "$SESSION" --save_root "$SAVE_ROOT" --data_root "$DATASET_ROOT" \
    "${METHOD_ARGS[@]}" --weights "$WEIGHTS" --train_list "$TRAIN_LIST" \
    --crop_size "$CROP" --resize_size "${RESIZE_A[@]}" --max_iters "$MAX_ITERS" \
    --batch_size "$BATCH" --lr "$LR" --wt_dec "$WT_DEC" \
    --num_workers "$NUM_WORKERS" --device "$DEVICE" $(resume_flag "$RUN_DIR") "${TRAIN_X[@]}"
}

# 2. CAMs -> pseudo-masks on the evaluation list; infer.py itself skips ids already done.
stage_infer() {
  need_file "$CKPT" "It is the train stage's output: add 'train' to STAGES."
  say "pseudo-masks on $INFER_LIST -> $RESULT/png"
  launch "$REPO/infer.py" --dataset "$DATASET" "${META[@]}" --infer_list "$INFER_LIST" \
    --img_root "$DATASET_ROOT" --weights "$CKPT" --thr "$THR" --png-dir "$RESULT/png" \
    "${CAMS[@]}" --vis-dir "$RESULT/vis" --vis-num "$VIS_NUM" --run-dir "$RESULT/infer_run" \
    --num-workers "$NUM_WORKERS" --device "$DEVICE" "${INFER_X[@]}"
}

# 3. pseudo-mask mIoU; skipped once the result table exists.
stage_eval() {
  if [[ -f "$EVAL_TXT" ]]; then skip eval "$EVAL_TXT"; return; fi
  say "evaluate $RESULT/png on $INFER_LIST"
  "$PYTHON" "$REPO/evaluate.py" --dataset "$DATASET" "${META[@]}" --datalist "$INFER_LIST" \
    --gt_dir "$GT_DIR" --pred_dir "$RESULT/png" --save_path "$EVAL_TXT" "${EVAL_X[@]}"
}

# 4. pseudo-masks for DeepLab's training list, into the same folder (only missing ids are made).
stage_pseudo() {
  need_file "$CKPT" "It is the train stage's output: add 'train' to STAGES."
  say "pseudo-masks on $SEG_LIST -> $RESULT/png"
  launch "$REPO/infer.py" --dataset "$DATASET" "${META[@]}" --infer_list "$SEG_LIST" \
    --img_root "$DATASET_ROOT" --weights "$CKPT" --thr "$THR" --png-dir "$RESULT/png" \
    --run-dir "$RESULT/infer_run" --num-workers "$NUM_WORKERS" --device "$DEVICE" "${INFER_X[@]}"
}

# 5. DeepLab-v2 on the pseudo-masks; skipped once checkpoint_final.pth exists.
stage_seg() {
  if [[ -f "$SEG_DIR/checkpoint_final.pth" ]]; then skip seg "$SEG_DIR/checkpoint_final.pth"; return; fi
  say "train $SEG_ARCH on the $SEG_LIST pseudo-masks -> $SEG_DIR"
  # shellcheck disable=SC2046
  launch "$REPO/train_seg.py" --dataset "$DATASET" "${META[@]}" --data_root "$DATASET_ROOT" \
    --mask-dir "$RESULT/png" --train_list "$SEG_LIST" --arch "$SEG_ARCH" --init "$SEG_INIT" \
    --max-iters "$SEG_ITERS" --batch-size "$SEG_BATCH" --iter-size "$SEG_ITER_SIZE" \
    --crop-size "$SEG_CROP" --lr "$SEG_LR" --num-workers "$NUM_WORKERS" --device "$DEVICE" \
    --run-dir "$SEG_DIR" $(resume_flag "$SEG_DIR") "${SEG_X[@]}"
}

# 6. DeepLab on the evaluation split (+ dense CRF) -> mIoU; skipped once the tables exist.
stage_segeval() {
  if [[ -f "${SEG_PRED}_eval.txt" && ( "$SEG_CRF" != 1 || -f "${SEG_PRED}_crf_eval.txt" ) ]]; then
    skip segeval "${SEG_PRED}_eval.txt"; return
  fi
  need_file "$SEG_DIR/checkpoint_final.pth" "It is the seg stage's output: add 'seg' to STAGES."
  say "DeepLab on $SEG_EVAL_LIST -> $SEG_PRED"
  launch "$REPO/infer_seg.py" --dataset "$DATASET" "${META[@]}" --data_root "$DATASET_ROOT" \
    --list "$SEG_EVAL_LIST" --weights "$SEG_DIR/checkpoint_final.pth" --out-dir "$SEG_PRED" \
    "${CRF[@]}" --evaluate --gt_dir "$SEG_GT_DIR" --num-workers "$NUM_WORKERS" \
    --device "$DEVICE" "${SEGINFER_X[@]}"
}

# The results next to the published numbers (PUBLISHED_PSEUDO, PUBLISHED_SEG from the script).
print_results() {
  echo
  echo "| $SESSION | list | published mIoU | this run |"
  echo "|---|---|---|---|"
  result_row "pseudo-masks (thr $THR, no CRF)" "$INFER_LIST" "$PUBLISHED_PSEUDO" "$EVAL_TXT"
  if want seg || want segeval || [[ -f "${SEG_PRED}_eval.txt" ]]; then
    result_row "DeepLab-v2" "$SEG_EVAL_LIST" "$PUBLISHED_SEG" "${SEG_PRED}_eval.txt"
    if [[ "$SEG_CRF" == 1 ]]; then
      result_row "DeepLab-v2 + CRF" "$SEG_EVAL_LIST" "$PUBLISHED_SEG" "${SEG_PRED}_crf_eval.txt"
    fi
  fi
}
