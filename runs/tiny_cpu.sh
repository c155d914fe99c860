#!/usr/bin/env bash
# The whole nanoCOOPER pipeline on the tiny CPU preset (2 cores: ~24 min on a slow day of an AMD EPYC, less on a fast one), one step after another:
# data -> tokenizer -> VQ -> the Base arm -> stage 1 (from Base) -> stage 2 SFT (COOPER and RE arms) -> RL
# -> eval ($OUT/report/report.md). Every step writes under $OUT (default out/); a step whose
# $OUT/<name>/final.json exists is skipped, so a rerun continues where it stopped; `rm -r out data`
# starts over. Each step's last line is `final: {json}`, kept as final.json.
# EXTRA=1 also trains the token-matched Base arm (the tokens of Base and stage 1 together); UNTIL=<step> stops after that step.
# SEEDS=N also trains every arm again with seeds 2..N under $OUT/seed<s>/ (same data, tokenizer and VQ)
# and evaluates all N: the full experiment. (With $OUT/eval done, `rm -r $OUT/eval` to re-evaluate.)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-config/tiny_cpu.py}  # e.g. PRESET=config/cpu64.py OUT=out/cpu64 for the longer setting
OUT=${OUT:-out}
VQ=$OUT/vqgan/ckpt.pt
T0=$SECONDS
case "${SEEDS:-1}" in
  ''|*[!0-9]*) echo "SEEDS must be a whole number of seeds, not '${SEEDS}'" >&2; exit 2 ;;
esac

step() {  # step NAME COMMAND...: run unless $OUT/NAME/final.json exists, keep the final line there
  local name=$1 d=$OUT/$1; shift
  if [ -f "$d/final.json" ]; then echo "== $name: done before ($(cat "$d/final.json"))"; return; fi
  echo "== $name: $*"
  local t=$SECONDS
  mkdir -p "$d"
  "$@" 2>&1 | tee "$d/log.txt"
  grep '^final: ' "$d/log.txt" | tail -1 | sed 's/^final: //' > "$d/final.json.tmp"
  mv "$d/final.json.tmp" "$d/final.json"
  echo "== $name took $((SECONDS - t)) s"
  stop_after $name
}
# Two independent steps side by side, one thread each. For RL this pays: it mostly decodes, which
# a second thread barely speeds up, so the pair takes little longer than COOPER's RL alone. Training
# steps do not pair well (measured for stage 2: one thread runs at ~57% of two, and once the shorter
# step ends the longer one still has only one). Output lines are prefixed with the step's name.
STARTED=()
beside() {  # beside NAME COMMAND...: `step` in the background
  (export OMP_NUM_THREADS=1; step "$@" 2>&1 | sed -u "s|^|[$1] |") &
  STARTED+=("$!:$1")
}
joined() {  # wait for every step started with `beside` (a failed one stops the pipeline)
  local started=("${STARTED[@]}") e
  STARTED=()
  for e in "${started[@]}"; do wait "${e%%:*}"; done
  for e in "${started[@]}"; do stop_after "${e#*:}"; done
}
stop_after() {  # exit here if UNTIL names this step (inside a subshell this ends only the subshell)
  if [ "${UNTIL:-}" = "$1" ]; then echo "stopping after $1 (UNTIL=$1)"; exit 0; fi
}

step data python data.py $PRESET                                   # the scenes and questions
step tokenizer python tokenizer.py $PRESET                         # the text BPE
step vqgan python vqgan.py $PRESET --out_dir=$OUT/vqgan            # the VQ tokenizer

arms() {  # arms PREFIX SEED_ARGS: train every arm under $OUT/PREFIX, each stage from the one before it
  local p=$1 s=$2 R=$OUT${1:+/${1%/}}
  step ${p}base python train_stage1.py $PRESET $s --vq_ckpt=$VQ --aux=False --out_dir=$R/base      # the Base arm: VQA only
  # stage 1 starts from Base, as the paper's starts from a pretrained model that already answers questions
  step ${p}stage1 python train_stage1.py $PRESET $s --vq_ckpt=$VQ --init_from=$R/base/ckpt.pt --out_dir=$R/stage1  # + depth/seg generation
  if [ -z "$p" ] && [ "${EXTRA:-0}" = 1 ]; then
    TOKENS=$(python -c "import json; print(sum(json.load(open(f'$R/{a}/final.json'))['tokens'] for a in ('base', 'stage1')))")
    step base_tokens python train_stage1.py $PRESET --vq_ckpt=$VQ --aux=False --out_dir=$R/base_tokens --token_budget=$TOKENS
  fi
  step ${p}stage2 python train_stage2.py $PRESET $s --vq_ckpt=$VQ --init_from=$R/stage1/ckpt.pt --out_dir=$R/stage2  # COOPER: interleaved SFT
  step ${p}stage2_text python train_stage2.py $PRESET $s --vq_ckpt=$VQ --tools=none --init_from=$R/base/ckpt.pt --out_dir=$R/stage2_text  # RE: text CoT SFT
  # the two RL arms side by side (see `beside`)
  beside ${p}rl python rl.py $PRESET $s --vq_ckpt=$VQ --init_from=$R/stage2/ckpt.pt --out_dir=$R/rl  # COOPER: GRPO with the CPR reward
  beside ${p}rl_text python rl.py $PRESET $s --vq_ckpt=$VQ --tools=none --init_from=$R/stage2_text/ckpt.pt --out_dir=$R/rl_text  # RE: text-only GRPO
  joined
}

arms "" ""
RUNS=$OUT
for s in $(seq 2 "${SEEDS:-1}"); do  # the same arms from another seed (same data, tokenizer and VQ)
  arms "seed$s/" "--seed=$s"
  RUNS=$RUNS,$OUT/seed$s
done
step eval python eval.py $PRESET --vq_ckpt=$VQ --runs=$RUNS --report_dir=$OUT/report  # Table 1 analog -> $OUT/report/report.md
echo "pipeline done in $(( (SECONDS - T0) / 60 )) min $(( (SECONDS - T0) % 60 )) s"
