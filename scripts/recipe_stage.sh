# Sourced by the recipes (scripts/train_*.sh): `stage NAME COMMAND...` runs COMMAND when the comma-separated
# $stages lists NAME (every stage when $stages is unset) and appends its wall time to $run/timings.txt.
stage() {
  local name=$1 started=$SECONDS
  shift
  [[ -z "${stages:-}" || ",$stages," == *",$name,"* ]] || return 0
  "$@"
  echo "$name $((SECONDS - started)) s" | tee -a "$run/timings.txt"
}

# The default model's prior (scripts/train_default.sh, stage 4), also the SUNDAE side of scripts/train_var.sh:
# class-conditional 2D hourglass 2-4-2 (shorten 2x2 -> a 4x4 valley), width 192, SUNDAE T=2 (Table 3's MNIST
# column, scaled down), EMA with warm-up, label dropout 0.1 for guidance; its steps: default_prior_steps.
default_prior=(--preset fashion-mnist --dim 192 --heads 3 --head-dim 64 --depth 2,4,2 --batch-size 128 --lr 1e-3
  --warmup-steps 200 --ema-decay 0.999 --log-every 50 --eval-every 400 --eval-batches 8 --sample-every 800
  --checkpoint-every 200)
default_prior_steps=2100  # 78 min on a 2-core AMD EPYC in bf16 (the shipped prior)
