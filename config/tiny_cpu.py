# The default preset: the whole pipeline, all four arms, on a 2-core CPU in about 24 minutes on a slow day of an
# AMD EPYC, the slower machine measured (~18–20 on its faster days; runs/tiny_cpu.sh; each step's time is in docs/experiments.md).
# 48×48 scenes and 12×12 codes an image: 64 px makes every sequence ~1.8× longer, 32 px loses small
# objects in the VQ round trip.
# Short runs make this a demonstration of the pipeline; config/cpu64.py is the longer setting.
# Each dict configures one script (see configurator.py); "_" names are this file's helpers.
_data_dir = "data/tiny"

data = dict(out_dir=_data_dir, n_train=4000, n_val=200, n_test=400, image_size=48)  # ~13 s, ~22 MB
tokenizer = dict(data_dir=_data_dir, vocab_size=1024)  # ~12 s
# the VQ: 2400 steps of 8 images, GAN from step 1800, 96 channels, seg images drawn twice as often as RGB or depth;
# ~3–4.5 min. The seg round trip caps the seg maps stage 1 draws: 1600 steps lost it (0.674 ids matched against
# 0.709), 3200 kept 0.712 (palette mIoU) where 2400 keep 0.699 in 0.71× the time (docs/experiments.md); vqgan.py's
# defaults (4800 steps, the modalities alike; bench.py learn's VQ) take twice the time. The first training
# script then encodes every split (~22 s).
vqgan = dict(data_dir=_data_dir, image_size=48, channels=96, max_iters=2400, disc_start=1800, modality_weights=(1.0, 1.0, 2.0))
# stage 1 (and the Base arm with --aux=False): train_stage1.py's design, 4 layers × 128 wide (one K/V head for four
# query heads) with Muon (its rate held, then falling over the last 40%), the object and depth heads, the referring
# loss, the pixel reader (on the photo's own pixels), 7 questions an image, questions after the maps too, and the
# seg head guiding the seg maps, which Base trains without; sequences of ~350 (VQA) to ~520 tokens (RGB, depth, seg,
# question, answer). 1760 iterations of 4 sequences, ~0.2–0.25 s each on the AMD EPYC:
# the tokens of 440 iterations of 16, in 4× the steps, which is what the answers need. runs/tiny_cpu.sh
# starts stage 1 from Base's weights: from scratch (VQA 1 or 3 parts to 1.5 of maps) its answers
# passed chance in one run of six; from Base they keep its comparisons (docs/experiments.md).
# number_weight=0: the number head, which pays from ~5M tokens on (bench.py learn), delays the
# comparisons before that: with it this preset's Base scored depth order 0.2 and relation 0.15
# (vqa_acc 0.4214 against 0.5761 without; docs/experiments.md).
# seg_weight=1.0: twice stage 1's default seg rows: seg matched + 0.014 on 200 val scenes (0.5183 against 0.5045),
# object depth 0.092 against 0.087, vqa_acc level (docs/experiments.md).
# base_iters: the Base arm trains 2640 iterations; at 1760 it answered every counting question "1" (test)
# and its vqa_acc was 0.59 against 0.72 at 2640, which stage 1, starting from it, builds on.
stage1 = dict(data_dir=_data_dir, block_size=640, batch_size=4, max_iters=1760, warmup_iters=20, log_interval=40,
              # maps of 96 val scenes: on 32, the sampled maps' figures moved by ±0.01–0.02 (docs/experiments.md)
              eval_interval=1760, eval_scenes=96, eval_questions=280,  # 40 val questions a category
              number_weight=0.0, base_iters=2640, seg_weight=1.0)
eval = dict(data_dir=_data_dir, n_questions=210, n_map_scenes=32)  # 30 test questions a category, maps of 32 scenes
# stage 2 SFT on interleaved traces (~350 tokens: RGB, map, text), then 70 val replies through the
# tool loop. 200 iterations: after 100 the sampled replies broke the format half the time; 250 took 44 s
# more with the report inside its noise (docs/experiments.md).
# reading="brief": the traces' plan is one fixed sentence a tool and their last thought one fixed
# sentence, not a reading of the map; the readings this model writes name the wrong objects and
# its answers follow them. place_losses: stage 1's object and referring losses stay on, which
# keeps more of its comparisons (docs/experiments.md).
stage2 = dict(data_dir=_data_dir, max_iters=200, eval_interval=200, batch_size=8, eval_questions=70, reading="brief",
              place_losses=True)
# RL (GRPO + CPR): an iteration is 4 questions × 8 rollouts, ~10 s on one thread; held-out replies
# at the start and the end. 8 iterations show the machinery, not a gain; at 1e-4 and 3e-4 held-out
# accuracy fell further than at 3e-5 (docs/experiments.md). max_new_tokens 420: two maps (~146 tokens each) and text.
rl = dict(data_dir=_data_dir, max_iters=8, eval_interval=8, prompts_per_batch=4, group_size=8, max_new_tokens=420,
          learning_rate=3e-5, min_lr=3e-5, warmup_iters=2, eval_questions=70, eval_reward_questions=8)
