# The default preset: the whole pipeline on a 2-core CPU in minutes, 64×64 synthetic scenes.
# Each dict configures one script (see configurator.py); "_" names are this file's helpers.
_data_dir = "data/tiny"

data = dict(out_dir=_data_dir, n_train=4000, n_val=200, n_test=400, image_size=64)  # ~6 s, ~25 MB
tokenizer = dict(data_dir=_data_dir, vocab_size=1024)  # ~1 s
# stage 2a SFT on interleaved traces from out/stage1 (a trace is ~600 tokens: RGB, map, text);
# ends with a greedy pass over 280 val questions through the tool loop. Cost: measured below.
stage2 = dict(data_dir=_data_dir, max_iters=300, eval_interval=300, batch_size=16, eval_questions=280)
