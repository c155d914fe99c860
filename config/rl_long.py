# An overlay on a preset for a longer RL run, 16 questions × 8 replies an iteration (4× the
# preset's), 30 iterations at Adam 3e-5, after the preset's pipeline:
#   python rl.py config/tiny_cpu.py config/rl_long.py --seed=S --out_dir=out/rl_long/sS
# runs/rl_seeds.sh runs several seeds side by side (42–43 min a seed on one thread each) and
# runs/rl_table.py tabulates them. Held-out: greedy replies to 280 val questions (40 a category),
# and 8 sampled replies to 56 of them. What it measured: docs/experiments.md.
rl = dict(prompts_per_batch=16, max_iters=30, eval_interval=10, learning_rate=3e-5, min_lr=3e-5, warmup_iters=2,
          eval_questions=280, eval_reward_questions=56)
