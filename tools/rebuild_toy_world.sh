#!/usr/bin/env bash
# Rebuild every shipped toy artefact from scratch, in order, with the project's own commands:
# the tiny base models, their preference pairs, a toy CLIP, and a step-aware preference model (SPM) per base model.
# The base models are toy world 2's (docs/toy-world-v2.md: a weave and lighting inside the shapes, decided in the
# middle steps), built in stages, each with its own one-cycle schedule: the shared sharp VAE (2,000 steps), then
# per family 2,500 and 5,000 UNet steps, and 5,000 more for SD1.5, whose captions are followed late (alignment
# 14 % / 50 % / 96 % after its stages; SDXL 16 % / 84 %). Measured on 2 CPU cores (2026-12-07): 14 minutes for the
# VAE (two threads), then 96 (SD1.5) and 65 (SDXL) minutes for the UNets, both families in parallel, one thread each,
# then 7 minutes for a decoder fine-tune. The shipped models were built by step 1 stage by stage (not in one run);
# the rest ran as it stands with MODELS= those models (2026-12-07), the SPMs again after their VAE's posterior was
# pinned (`spo.toy.build.pin_posterior`, now part of the VAE stage), and each family's a third time with 2,400 steps
# instead of 800 (step 4; SDXL 2026-12-07, SD1.5 2026-12-07/08). Every step after the models are copied in
# follows their world (`spo.toy.defaults.shipped_world`: the judge's aesthetic, the renders of the pairs and the toy
# CLIP). The rest took, two jobs at a time: 6 minutes for the render pairs, 10 for each family's model pairs and
# 27-29 for an SPM of 2,400 steps (800 steps: 12), and 10 for the toy CLIP.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per job: two jobs on two cores without spin contention
ASSETS=src/spo/assets
WORK=${WORK:-outputs/toy_world}
mkdir -p "$WORK"

# 1. base models (VAE + UNet + text encoders): the VAE once for both families, then each family's UNet.
#    MODELS=DIR (with sd15/ and sdxl/ inside) ships models built earlier by these same commands instead.
if [[ -z "${MODELS:-}" ]]; then
  OMP_NUM_THREADS=2 spo toy build --world 2 --family both --vae-steps 2000 --decoder-steps 0 --unet-steps 0 \
    --out "$WORK/models_stage0" > "$WORK/build_stage0.log" 2>&1
  for family in sd15 sdxl; do
    (
      spo toy build --continue-from "$WORK/models_stage0" --family "$family" --unet-steps 2500 --decoder-steps 0 \
        --out "$WORK/models_stage1"
      spo toy build --continue-from "$WORK/models_stage1" --family "$family" --unet-steps 5000 --decoder-steps 0 \
        --out "$WORK/models_stage2"
      # SD1.5's UNet learns to follow its captions more slowly than SDXL's (no pooled text embedding):
      # alignment 14 % after stage 1, 50 % after stage 2; a third stage for it
      if [[ $family == sd15 ]]; then
        spo toy build --continue-from "$WORK/models_stage2" --family sd15 --unet-steps 5000 --decoder-steps 0 \
          --out "$WORK/models"
      else
        mkdir -p "$WORK/models" && rm -rf "$WORK/models/sdxl" && cp -r "$WORK/models_stage2/sdxl" "$WORK/models/sdxl"
      fi
    ) > "$WORK/build_$family.log" 2>&1 &
  done
  wait
  # the shared decoder alone, fine-tuned on the same renders (encoder, hence latent space, kept): the round trip
  # keeps 86-88 % of the clean renders' margin over the base samples instead of 77 %
  spo toy build --continue-from "$WORK/models" --family both --unet-steps 0 --decoder-steps 1000 \
    --out "$WORK/models_final" > "$WORK/build_decoder.log" 2>&1
  MODELS="$WORK/models_final"
fi
rm -rf "$ASSETS/toy_models/sd15" "$ASSETS/toy_models/sdxl"
cp -r "$MODELS/sd15" "$ASSETS/toy_models/sd15"
cp -r "$MODELS/sdxl" "$ASSETS/toy_models/sdxl"

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

SPM_STEPS=2400
for family in sd15 sdxl; do
  (
    # 3b. pairs from the base model's own samples, train and held-out captions
    spo toy pairs --family "$family" -n 1000 --seed 1 --out "$WORK/pairs_${family}_train.parquet"
    spo toy pairs --family "$family" -n 400 --seed 2 --split heldout --out "$WORK/pairs_${family}_heldout.parquet"
    # 4. the SPM for this base model, and a time-unconditioned one on the same budget for comparison: 2,400 steps,
    #    three passes over the pairs (SPO with it, against 800 steps: SDXL +0.55 base std against +0.36 after 2
    #    epochs; SD1.5 +0.46 against +0.27 after 3 epochs, where 800 steps stop gaining after 2)
    SPM_ARGS=(--base "toy:$family" --init "$WORK/toy_clip" --max-train-steps "$SPM_STEPS" --train-batch-size 16 --learning-rate 5e-4 --lr-warmup-steps 50 --lr-schedule cosine --weight-decay 0.05
              --checkpoint-every-steps 100 --no-progress)
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
