#!/usr/bin/env bash
# The whole nanoCOOPER pipeline on the tiny CPU preset (2 cores), one step after another:
# data -> tokenizer -> VQ -> stage 1 (and the Base arm) -> stage 2 SFT (COOPER and RE arms) -> RL.
# A step whose out/<name>/final.json exists is skipped, so a rerun continues where it stopped;
# `rm -r out data` starts over. Each step's last line is `final: {json}`, kept as final.json.
# EXTRA=1 also trains the token-matched Base arm (same total tokens as stage 1); UNTIL=<step> stops after that step.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=config/tiny_cpu.py
T0=$SECONDS

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
step eval python eval.py $PRESET                                   # Table 1 analog -> report/report.md
echo "pipeline done in $(( (SECONDS - T0) / 60 )) min $(( (SECONDS - T0) % 60 )) s"
