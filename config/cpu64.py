# The 64-px CPU preset: the tiny preset's pipeline at 64×64 with 16×16 codes and longer runs.
# ~4 h on 2 cores (VQ 41 min, stage 1 63, Base 49, stage 2 25 + 12, RL 24 + 8, eval 15). Its
# scripts use the tiny preset's out/ paths unless told otherwise, so run it as
#   PRESET=config/cpu64.py OUT=out/cpu64 bash runs/tiny_cpu.sh
# Each dict configures one script (see configurator.py); "_" names are this file's helpers.
_data_dir = "data/cpu64"

data = dict(out_dir=_data_dir, n_train=4000, n_val=200, n_test=400, image_size=64)  # ~13 s, ~26 MB
tokenizer = dict(data_dir=_data_dir, vocab_size=1024)  # ~1 s
vqgan = dict(data_dir=_data_dir, image_size=64, channels=128, max_iters=3200, disc_start=2400)
# stage 1 (and the Base arm with --aux=False): train_stage1.py's model and learning options; sequences
# of ~290 (VQA, one question) to ~830 tokens. 2400 iterations of 4 sequences, for the tiny preset's
# reason. The times above and the 4.67M tokens in ~55 min were measured before that design (4×256,
# AdamW, one question an image, objects out to 8 m) and before batches of 4.
stage1 = dict(data_dir=_data_dir, block_size=1024, batch_size=4, max_iters=2400, warmup_iters=20, log_interval=40,
              eval_interval=1200, eval_scenes=32, eval_questions=140)
eval = dict(data_dir=_data_dir, n_questions=280, n_map_scenes=64)
# stage 2 SFT on interleaved traces (~570 tokens): 200 iterations at ~0.9 s, then 210 val replies.
# Brief traces and the place losses, as the tiny preset's (config/tiny_cpu.py says why).
stage2 = dict(data_dir=_data_dir, max_iters=200, eval_interval=200, batch_size=8, eval_questions=210, reading="brief",
              place_losses=True)
# RL: 4 questions × 8 rollouts an iteration; Adam 3e-5 (at 1e-4 entropy climbed and accuracy fell
# within 12 steps). max_new_tokens 800: two maps (~270 tokens each) and the text.
rl = dict(data_dir=_data_dir, max_iters=30, eval_interval=30, prompts_per_batch=4, group_size=8, max_new_tokens=800,
          learning_rate=3e-5, min_lr=3e-5, warmup_iters=2, eval_questions=70, eval_reward_questions=14)
