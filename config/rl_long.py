# An overlay on a preset for the RL run that #9 measures: after the preset's pipeline,
#   python rl.py config/tiny_cpu.py config/rl_long.py --seed=S --out_dir=out/rl_long/sS
# (runs/rl_seeds.sh runs several seeds side by side and tabulates them). The preset's own RL (12
# iterations of 4 questions × 8 replies) shows the machinery; at that size the policy gradient is
# mostly noise (README, "RL: the learning rate"). Here an iteration is 16 questions × 8 replies,
# 4× the rollouts a step, at the same Adam 3e-5: at 1e-4 the held-out reward rose for 20 iterations
# and then fell below its start, with entropy climbing and the format breaking. ~40 min a seed on
# one thread. Held-out: greedy replies to 280 val questions (40 a category, a constant answer's luck
# on a small sample is the noise), and accuracy and reward of 8 sampled replies to 56 of them.
rl = dict(prompts_per_batch=16, max_iters=30, eval_interval=10, learning_rate=3e-5, min_lr=3e-5, warmup_iters=2,
          eval_questions=280, eval_reward_questions=56)
