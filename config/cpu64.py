# The 64-px CPU preset: the tiny preset's pipeline at 64×64 with 16×16 codes and longer runs, the
# setting behind the README's Table 1 (commit 414091e) and stage-1 measurements. Hours on 2 cores:
# ~4 h on a slow machine (2026-12-01/02: VQ 41 min, stage 1 63, Base 49, stage 2 25 + 12, RL 24 + 8,
# eval 15), about a quarter of that on a fast one. Its scripts use the same out/ paths as the tiny
# preset unless told otherwise, so run it in its own checkout, or as
#   PRESET=config/cpu64.py OUT=out/cpu64 bash runs/tiny_cpu.sh
# Each dict configures one script (see configurator.py); "_" names are this file's helpers.
_data_dir = "data/cpu64"

data = dict(out_dir=_data_dir, n_train=4000, n_val=200, n_test=400, image_size=64)  # ~13 s, ~26 MB
tokenizer = dict(data_dir=_data_dir, vocab_size=1024)  # ~1 s
vqgan = dict(data_dir=_data_dir, image_size=64, max_iters=3200, disc_start=2400)
# stage 1 (and the Base arm with --aux=False): 4 layers × 256 wide (3.5M parameters), 16×16 codes an
# image, so sequences run from ~290 tokens (VQA) to ~830 (RGB, depth, seg, question, answer).
# 600 iterations (4.67M tokens, 55 min at ~1.6k tok/s on the slow machine): with the grid prior the
# maps have the objects in place (object depth AbsRel 0.18, seg mIoU 0.15; README: Stage 1).
stage1 = dict(data_dir=_data_dir, block_size=1024, batch_size=16, max_iters=600, warmup_iters=20,
              eval_interval=300, eval_scenes=32, eval_questions=140)
eval = dict(data_dir=_data_dir, n_questions=280, n_map_scenes=64)
# stage 2a SFT on interleaved traces from out/stage1 (a trace is ~570 tokens: RGB, map, text):
# 200 iterations × 8 traces at ~0.9 s, then replies (text greedy, maps sampled) to 210 val questions
# through the tool loop: ~4 min (the RE arm, text only: ~2 min).
stage2 = dict(data_dir=_data_dir, max_iters=200, eval_interval=200, batch_size=8, eval_questions=210)
# RL (GRPO + CPR) from out/stage2 (--tools=none: from out/stage2_text): an iteration = 4 questions ×
# 8 rollouts and one optimizer step on the groups whose rewards differ; the held-out evaluation runs
# at the start and the end (70 replies, text greedy; 14 val questions × 8 sampled for the reward). Adam at
# 1e-4 made the tiny models' entropy climb and accuracy fall within 12 steps; 3e-5 held steady.
# max_new_tokens 800: two maps (~270 tokens each) and the text; 512 cut every second tool call off.
rl = dict(data_dir=_data_dir, max_iters=30, eval_interval=30, prompts_per_batch=4, group_size=8, max_new_tokens=800,
          learning_rate=3e-5, min_lr=3e-5, warmup_iters=2, eval_questions=70, eval_reward_questions=14)
