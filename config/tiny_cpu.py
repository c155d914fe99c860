# The default preset: the whole pipeline, all four arms, on a 2-core CPU in under 20 minutes: 19 min 42 s
# from a fresh clone on a 2-core AMD EPYC (~165 GFLOP/s fp32 matmul; README, "The tiny preset end to
# end in 19 min 42 s", has each step). With stage 1 at 250 iterations, stage 2 at 300, RL at 15 and a
# 128-channel VQ of 2000 steps it took 24 min 18 s there.
# 48×48 synthetic scenes and 12×12 codes an image: 64 px would make every sequence ~1.8× longer, 32 px
# loses small objects in the VQ round trip (seg mIoU 0.32, against 0.66 at 48 px). Short runs make
# this a demonstration of the pipeline, not the experiment: config/cpu64.py is the longer setting.
# Each dict configures one script (see configurator.py); "_" names are this file's helpers.
_data_dir = "data/tiny"

data = dict(out_dir=_data_dir, n_train=4000, n_val=200, n_test=400, image_size=48)  # ~13 s, ~22 MB
tokenizer = dict(data_dir=_data_dir, vocab_size=1024)  # ~12 s
# the VQ: 1600 steps of 8 images (GAN from step 1200), then the first training script encodes every split.
# 96 channels, not 128: at 2000 steps 0.6x the time (168 s against 272 s here) for the same RGB and depth
# round trip (27.0 dB, object depth AbsRel 0.045 against 0.048) and seg mIoU 0.50 against 0.58
vqgan = dict(data_dir=_data_dir, image_size=48, channels=96, max_iters=1600, disc_start=1200)
# stage 1 (and the Base arm with --aux=False): 4 layers × 256 wide (3.5M parameters); sequences run
# from ~175 tokens (VQA) to ~520 (RGB, depth, seg, a question with five options, answer), ~4.5k
# tokens an iteration. 200 iterations: ~1.05 s each on 2 cores.
stage1 = dict(data_dir=_data_dir, block_size=640, batch_size=16, max_iters=200, warmup_iters=20,
              eval_interval=200, eval_scenes=32, eval_questions=140)
eval = dict(data_dir=_data_dir, n_questions=210, n_map_scenes=32)  # 30 test questions a category, maps of 32 scenes
# stage 2a SFT on interleaved traces from out/stage1 (a trace is ~350 tokens: RGB, map, text), then
# replies (text greedy, maps sampled) to 70 val questions through the tool loop. 250 iterations, not
# 100: after 100 COOPER's sampled replies broke the format half the time and RL had nothing sound to
# start from (README, "The tiny preset, stage 2 at 300 iterations").
stage2 = dict(data_dir=_data_dir, max_iters=250, eval_interval=250, batch_size=8, eval_questions=70)
# RL (GRPO + CPR) from out/stage2 (--tools=none: from out/stage2_text): an iteration = 4 questions ×
# 8 rollouts and one optimizer step on the groups whose rewards differ; the held-out evaluation runs
# at the start and the end (70 replies, text greedy; 8 val questions × 8 sampled for the reward).
# At 64 px (config/cpu64.py) Adam at 1e-4 made entropy climb and accuracy fall within 12 steps, and
# 3e-5 held steady; here COOPER's held-out accuracy still fell at 3e-5, and fell further at 1e-4 and
# collapsed at 3e-4 (README). 12 iterations (~10 s each on one thread) keep the pipeline under 20
# minutes; they show the machinery, not a gain. max_new_tokens 420: two maps (~146 tokens each) and the text.
rl = dict(data_dir=_data_dir, max_iters=12, eval_interval=12, prompts_per_batch=4, group_size=8, max_new_tokens=420,
          learning_rate=3e-5, min_lr=3e-5, warmup_iters=2, eval_questions=70, eval_reward_questions=8)
