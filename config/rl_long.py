# An overlay on a preset for the RL run that #9 measures: after the preset's pipeline,
#   python rl.py config/tiny_cpu.py config/rl_long.py --seed=S --out_dir=out/rl_long/sS
# (runs/rl_seeds.sh runs several seeds side by side and tabulates them). The preset's own RL (12
# iterations of 4 questions × 8 replies) shows the machinery; at that size the policy gradient is
# mostly noise (README, "RL: the learning rate"). Here an iteration is 16 questions × 8 replies,
# 4× the rollouts a step, at the same Adam 3e-5: at 1e-4 (seed 1337) the held-out reward rose by
# iteration 10 (1.271 → 1.345) and fell below its start by 30 (1.054), with entropy climbing and
# the format breaking. 42–43 min a seed, two seeds side by side on 2 cores. Held-out: greedy replies
# to 280 val questions (40 a category: with 20, a constant letter answer that flips moved one
# category by 30 points), and accuracy and reward of 8 sampled replies to 56 of them. What it
# measured is in the README, "RL with 4× the rollouts a step".
rl = dict(prompts_per_batch=16, max_iters=30, eval_interval=10, learning_rate=3e-5, min_lr=3e-5, warmup_iters=2,
          eval_questions=280, eval_reward_questions=56)
