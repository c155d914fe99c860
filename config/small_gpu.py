# One GPU, about an hour end to end: 128×128 scenes, a 16×16-code VQ, a ~25M-parameter transformer.
#   python data.py config/small_gpu.py && python tokenizer.py config/small_gpu.py && python vqgan.py config/small_gpu.py
#   python train_stage1.py config/small_gpu.py --aux=False --out_dir=out/small/base   # the Base arm, then stage 1 from it:
#   python train_stage1.py config/small_gpu.py --init_from=out/small/base/ckpt.pt
#   python train_stage2.py config/small_gpu.py && python rl.py config/small_gpu.py
# Costs are estimates from FLOP counts (6·N·tokens at ~40% of an A100's bf16 peak), not measurements.
_data, _out = "data/small", "out/small"
_vq = _out + "/vqgan/ckpt.pt"
_model = dict(n_layer=8, n_head=8, n_kv_head=2, n_embd=512, block_size=1024, compile=True)  # ~25M parameters; a K/V head for 4 query heads

data = dict(out_dir=_data, n_train=50000, n_val=1000, n_test=2000, image_size=128)  # ~4 min on one core
tokenizer = dict(data_dir=_data, vocab_size=2048)
vqgan = dict(data_dir=_data, out_dir=_out + "/vqgan", image_size=128, downsample=8, channels=256, codebook_size=4096,
             batch_size=64, max_iters=20000, disc_start=10000)  # ~10 min
# stage 1: 20k iterations × 32 sequences × ~500 tokens ≈ 320M tokens ≈ 25 min
stage1 = dict(data_dir=_data, vq_ckpt=_vq, out_dir=_out + "/stage1", **_model, batch_size=32, max_iters=20000,
              learning_rate=6e-4, min_lr=6e-5, warmup_iters=500, eval_interval=2000, eval_scenes=200, eval_questions=700)
stage2 = dict(data_dir=_data, vq_ckpt=_vq, init_from=_out + "/stage1/ckpt.pt", out_dir=_out + "/stage2", batch_size=32,
              max_iters=4000, eval_interval=1000, eval_questions=700, compile=True)  # ~10 min
rl = dict(data_dir=_data, vq_ckpt=_vq, init_from=_out + "/stage2/ckpt.pt", out_dir=_out + "/rl", prompts_per_batch=16,
          group_size=8, max_iters=300, eval_interval=50, eval_questions=350, compile=True)  # ~15 min
