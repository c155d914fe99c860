# The default preset: the whole pipeline on a 2-core CPU in minutes, 64×64 synthetic scenes.
# Each dict configures one script (see configurator.py); "_" names are this file's helpers.
_data_dir = "data/tiny"

data = dict(out_dir=_data_dir, n_train=4000, n_val=200, n_test=400, image_size=64)  # ~6 s, ~25 MB
tokenizer = dict(data_dir=_data_dir, vocab_size=1024)  # ~1 s
