# Eight GPUs with torchrun, 256×256 images, a ~200M-parameter transformer, real data through manifests.
#   python data.py config/full_gpu.py          # imports real/{train,val,test}.jsonl (README, "Real data": the manifest format)
#   python tokenizer.py config/full_gpu.py && python vqgan.py config/full_gpu.py
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/full_gpu.py --aux=False --out_dir=out/full/base
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/full_gpu.py --init_from=out/full/base/ckpt.pt
#   torchrun --standalone --nproc_per_node=8 train_stage2.py config/full_gpu.py
#   torchrun --standalone --nproc_per_node=8 rl.py config/full_gpu.py
# Stage 2's traces read values off scene graphs, which real manifests do not have: until a trace
# builder for real data exists, train stage 2 and RL on synthetic scenes (data/small's splits).
# Costs are FLOP-count estimates (6·N·tokens at ~40% of 8×H100 bf16 peak), not measurements.
_data, _out = "data/full", "out/full"
_vq = _out + "/vqgan/ckpt.pt"
_model = dict(n_layer=16, n_head=16, n_kv_head=4, n_embd=1024, block_size=4096, compile=True)  # ~200M parameters; a K/V head for 4 query heads, as in the tiny preset

data = dict(out_dir=_data, image_size=256, manifest="real/{split}.jsonl")
tokenizer = dict(data_dir=_data, vocab_size=8192)
vqgan = dict(data_dir=_data, out_dir=_out + "/vqgan", image_size=256, downsample=8, channels=256, codebook_size=8192,
             batch_size=64, max_iters=100000, disc_start=50000)  # 32×32 codes an image
# stage 1: 50k iterations × 8 GPUs × 4 × 8 accumulated sequences ≈ 12.8M sequences × ~2k tokens ≈ 25B tokens ≈ 1 day
# Real data has no scene graphs to draw practice questions from: a row packs its image's own questions, and
# questions after the maps (drawn from the scene) are off.
stage1 = dict(data_dir=_data, vq_ckpt=_vq, out_dir=_out + "/stage1", **_model, practice="file", map_questions=False,
              batch_size=4, grad_accum=64, max_iters=50000, learning_rate=3e-4, min_lr=3e-5, warmup_iters=2000, eval_interval=2500,
              eval_scenes=500, eval_questions=2000)
stage2 = dict(data_dir=_data, vq_ckpt=_vq, init_from=_out + "/stage1/ckpt.pt", out_dir=_out + "/stage2", batch_size=4,
              grad_accum=32, max_iters=5000, eval_interval=1000, eval_questions=2000, compile=True)
rl = dict(data_dir=_data, vq_ckpt=_vq, init_from=_out + "/stage2/ckpt.pt", out_dir=_out + "/rl", prompts_per_batch=8,
          group_size=8, grad_accum=8, max_iters=1000, eval_interval=100, eval_questions=1000, compile=True)
