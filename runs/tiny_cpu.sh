#!/usr/bin/env bash
# The whole nanoCOOPER pipeline on the tiny CPU preset (2 cores), one step after another.
# Every step skips work whose output already exists, prints progress and ends with `final: {json}`.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=config/tiny_cpu.py

python data.py $PRESET        # synthetic scenes, depth, seg, questions: ~6 s
python tokenizer.py $PRESET   # byte-level BPE on the dataset's text: ~2 s
