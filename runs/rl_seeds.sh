#!/usr/bin/env bash
# RL with config/rl_long.py from the preset's stage 2, one run per seed, side by side on one thread
# each (RL mostly decodes, which a second thread barely speeds up), then their curves as tables and a
# PNG: $OUT/rl_long/s<seed>/, $OUT/rl_long/curves.png. Run after `bash runs/tiny_cpu.sh` (UNTIL=stage2
# is enough). SEEDS="1337 2" (the default) takes ~45 min on 2 cores; more seeds than cores queue up
# for CPU and each run takes longer. Arguments are passed on to every rl.py, after the config files:
#   SEEDS="1337 2 3" bash runs/rl_seeds.sh --learning_rate=1e-4 --min_lr=1e-4
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-config/tiny_cpu.py}
OUT=${OUT:-out}
SEEDS=${SEEDS:-"1337 2"}
mkdir -p "$OUT/rl_long"
runs=() pids=()
for s in $SEEDS; do
  d=$OUT/rl_long/s$s
  echo "== RL seed $s -> $d (log: $d.log)"
  OMP_NUM_THREADS=1 python rl.py "$PRESET" config/rl_long.py --seed="$s" --init_from="$OUT/stage2/ckpt.pt" \
    --vq_ckpt="$OUT/vqgan/ckpt.pt" --out_dir="$d" "$@" > "$d.log" 2>&1 &
  runs+=("$d") pids+=("$!")
done
for p in "${pids[@]}"; do wait "$p"; done  # a failed run stops here, its log says why
python runs/rl_table.py "${runs[@]}" --png="$OUT/rl_long/curves.png"
