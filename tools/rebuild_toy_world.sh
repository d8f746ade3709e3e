#!/usr/bin/env bash
# Rebuild every shipped toy artefact from scratch, in order, with the project's own commands:
# the tiny base models, their preference pairs, a toy CLIP, and a step-aware preference model (SPM) per base model.
# The shipped models were built in three stages (`build_info.json` -> history: 2,000 UNet steps; then
# `--continue-from` with 1,200 decoder and 2,500 UNet steps; then 3,000 more UNet steps); one `spo toy build`
# runs the same total budget. Measured on 2 CPU cores (2026-11-22, shared with other jobs): about 150 minutes
# for the models (both families in parallel, one thread each), a few minutes for the render pairs, about 20
# for each family's model pairs, 10 for the toy CLIP and 14 for each SPM.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per job: two jobs on two cores without spin contention
ASSETS=src/spo/assets
WORK=${WORK:-outputs/toy_world}
mkdir -p "$WORK"

# 1. base models (VAE + UNet + text encoders), both families side by side
spo toy build --family sd15 --out "$WORK/models" > "$WORK/build_sd15.log" 2>&1 &
spo toy build --family sdxl --out "$WORK/models_xl" > "$WORK/build_sdxl.log" 2>&1 &
wait
rm -rf "$ASSETS/toy_models/sd15" "$ASSETS/toy_models/sdxl"
cp -r "$WORK/models/sd15" "$ASSETS/toy_models/sd15"
cp -r "$WORK/models_xl/sdxl" "$ASSETS/toy_models/sdxl"

# 2. a tiny CLIP pretrained on renders: what PickScore / CLIP-ViT-H-14 are to a real SPM
spo toy clip --out "$WORK/toy_clip" > "$WORK/toy_clip.log" 2>&1

# 3a. generic preference pairs from "other generators" (renders with random defects, simulated rater), shared
#     by both families as Pick-a-Pic is: train captions for training, held-out captions for evaluation
#     (10 % of the training images miss their subject; the held-out ones never do, so that agreement with the
#     judge's aesthetic order is measured on images that show what their caption says)
spo toy pairs --source render -n 6000 --seed 5 --out "$WORK/pairs_render4_train_a.parquet" &
spo toy pairs --source render -n 6000 --seed 15 --out "$WORK/pairs_render4_train_b.parquet" &
wait
spo toy pairs --source render -n 600 --seed 6 --split heldout --p-missing 0 --out "$WORK/pairs_render_heldout.parquet"

for family in sd15 sdxl; do
  (
    # 3b. pairs from the base model's own samples, train and held-out captions
    spo toy pairs --family "$family" -n 1000 --seed 1 --out "$WORK/pairs_${family}_train.parquet"
    spo toy pairs --family "$family" -n 400 --seed 2 --split heldout --out "$WORK/pairs_${family}_heldout.parquet"
    # 4. the SPM for this base model, and a time-unconditioned one on the same budget for comparison
    SPM_ARGS=(--base "toy:$family" --init "$WORK/toy_clip" --max-train-steps 800 --train-batch-size 16 --learning-rate 5e-4 --lr-warmup-steps 50 --lr-schedule cosine --weight-decay 0.05
              --checkpoint-every 100 --no-progress)
    DATA=("$WORK/pairs_render4_train_a.parquet" "$WORK/pairs_render4_train_b.parquet" "$WORK/pairs_${family}_train.parquet")
    spo spm train "${DATA[@]}" --out "$WORK/spm_$family" "${SPM_ARGS[@]}"
    spo spm train "${DATA[@]}" --out "$WORK/spm_${family}_untimed" --time-conditioning false "${SPM_ARGS[@]}"
    rm -rf "$ASSETS/toy_spm/$family" && mkdir -p "$ASSETS/toy_spm" && cp -r "$WORK/spm_$family/spm" "$ASSETS/toy_spm/$family"
    # 5. evaluation on held-out captions, pairs with a clear judge-aesthetic difference, against the judge's
    #    aesthetic order: on the base model's own samples, and on held-out renders
    spo spm eval "$WORK/spm_$family" "$WORK/spm_${family}_untimed" --data "$WORK/pairs_${family}_heldout.parquet" \
      --base "toy:$family" --min-judge-gap 0.5 --against judge --out "docs/spm_eval_$family"
    spo spm eval "$WORK/spm_$family" "$WORK/spm_${family}_untimed" --data "$WORK/pairs_render_heldout.parquet" \
      --base "toy:$family" --min-judge-gap 0.5 --against judge --out "docs/spm_eval_${family}_renders"
  ) > "$WORK/spm_$family.log" 2>&1 &
done
wait
echo "toy world rebuilt under $ASSETS (logs in $WORK)"
