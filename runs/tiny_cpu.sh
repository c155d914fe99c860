#!/usr/bin/env bash
# The whole nanoCOOPER pipeline on the tiny CPU preset (2 cores), one step after another:
# data -> tokenizer -> VQ -> stage 1 (and the Base arm) -> stage 2 SFT (COOPER and RE arms) -> RL.
# A step whose out/<name>/final.json exists is skipped, so a rerun continues where it stopped;
# `rm -r out data` starts over. Each step's last line is `final: {json}`, kept as final.json.
# EXTRA=1 also trains the token-matched Base arm (same total tokens as stage 1); UNTIL=<step> stops after that step.
# SEEDS=N also trains every arm again with seeds 2..N under out/seed<s>/ (same data, tokenizer and VQ)
# and evaluates all N: the full experiment. (With out/eval done, `rm -r out/eval` to re-evaluate.)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=config/tiny_cpu.py
T0=$SECONDS
case "${SEEDS:-1}" in
  ''|*[!0-9]*) echo "SEEDS must be a whole number of seeds, not '${SEEDS}'" >&2; exit 2 ;;
esac

step() {  # step NAME COMMAND...: run unless out/NAME/final.json exists, keep the final line there
  local name=$1; shift
  if [ -f "out/$name/final.json" ]; then echo "== $name: done before ($(cat "out/$name/final.json"))"; return; fi
  echo "== $name: $*"
  local t=$SECONDS
  mkdir -p "out/$name"
  "$@" 2>&1 | tee "out/$name/log.txt"
  grep '^final: ' "out/$name/log.txt" | tail -1 | sed 's/^final: //' > "out/$name/final.json.tmp"
  mv "out/$name/final.json.tmp" "out/$name/final.json"
  echo "== $name took $((SECONDS - t)) s"
  if [ "${UNTIL:-}" = "$name" ]; then echo "stopping after $name (UNTIL=$name)"; exit 0; fi
}

step data python data.py $PRESET                                   # ~16 s: 4000/200/400 scenes
step tokenizer python tokenizer.py $PRESET                         # ~2 s
step vqgan python vqgan.py $PRESET                                 # the VQ tokenizer
step stage1 python train_stage1.py $PRESET                         # VQA + depth/seg generation
step base python train_stage1.py $PRESET --aux=False --out_dir=out/base   # the Base arm: VQA only
if [ "${EXTRA:-0}" = 1 ]; then
  TOKENS=$(python -c "import json; print(json.load(open('out/stage1/final.json'))['tokens'])")
  step base_tokens python train_stage1.py $PRESET --aux=False --out_dir=out/base_tokens --token_budget=$TOKENS
fi
step stage2 python train_stage2.py $PRESET                         # COOPER arm: interleaved SFT
step stage2_text python train_stage2.py $PRESET --tools=none       # RE arm: text-only CoT SFT
step rl python rl.py $PRESET                                       # COOPER: GRPO with the CPR reward
step rl_text python rl.py $PRESET --tools=none                     # RE: text-only GRPO
RUNS=out
for s in $(seq 2 "${SEEDS:-1}"); do  # the same arms from another seed: each stage starts from this seed's previous one
  R=out/seed$s
  step seed$s/stage1 python train_stage1.py $PRESET --seed=$s --out_dir=$R/stage1
  step seed$s/base python train_stage1.py $PRESET --seed=$s --aux=False --out_dir=$R/base
  step seed$s/stage2 python train_stage2.py $PRESET --seed=$s --init_from=$R/stage1/ckpt.pt --out_dir=$R/stage2
  step seed$s/stage2_text python train_stage2.py $PRESET --seed=$s --tools=none --init_from=$R/base/ckpt.pt --out_dir=$R/stage2_text
  step seed$s/rl python rl.py $PRESET --seed=$s --init_from=$R/stage2/ckpt.pt --out_dir=$R/rl
  step seed$s/rl_text python rl.py $PRESET --seed=$s --tools=none --init_from=$R/stage2_text/ckpt.pt --out_dir=$R/rl_text
  RUNS=$RUNS,$R
done
step eval python eval.py $PRESET --runs=$RUNS                      # Table 1 analog -> report/report.md
echo "pipeline done in $(( (SECONDS - T0) / 60 )) min $(( (SECONDS - T0) % 60 )) s"
