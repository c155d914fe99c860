"""
Benchmarks. Speed and memory targets live here, never in timed unit tests.

    python bench.py data            # one section
    python bench.py data model      # several
    python bench.py learn --minutes=5 --arm=maps   # learning against compute (see bench_learn)

Each section prints a table of its figures and merges them into bench.json (flat keys, so a later
run of one section keeps the others' figures). The last line is `final: {json}` with this run's figures.
"""
import json
import os
import sys
import time


def bench_data():
    """Scenes per second for the full per-scene work of `python data.py` (render rgb+depth+seg,
    questions) on one core at the tiny preset's resolution."""
    import numpy as np
    import data
    n = 500
    t0 = time.perf_counter()
    for i in range(n):
        scene = data.render_scene([0, 0, i], data.SceneConfig())
        data.make_questions(scene["graph"], np.random.default_rng(i))
    dt = time.perf_counter() - t0
    return {"scenes_per_s": round(n / dt, 1), "data_resolution": data.SceneConfig().image_size}


def bench_kernels():
    """TFLOP/s of kernels.flash_attention against SDPA's flash backend, bf16, forward and
    forward+backward (backward counted as 2.5x forward, as the Triton tutorial does), causal and
    not, T = 512..8192 at 16k tokens per batch and H*D = 2048. The roofline these should be read
    against is in kernels.py's docstring. Needs CUDA."""
    import torch
    if not torch.cuda.is_available():
        print("kernels: needs CUDA (Triton kernels on a GPU); skipped")
        return {"kernels_cuda": False}
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    import kernels

    def sdpa(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    impls = {"": kernels.flash_attention, "sdpa_": sdpa}
    figures = {"kernels_cuda": True, "kernels_device": torch.cuda.get_device_name()}
    print("TFLOP/s, bf16, ours vs SDPA flash")
    print(f"{'T':>5} {'D':>4} {'causal':>6}  {'fwd':>7} {'sdpa':>7}  {'fwd+bwd':>7} {'sdpa':>7}")
    for D in (64, 128):
        for causal in (True, False):
            for T in (512, 1024, 2048, 4096, 8192):
                B, H = 16384 // T, 2048 // D
                q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
                               for _ in range(4))
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                tag = f"T{T}_D{D}_{'causal' if causal else 'noncausal'}"
                row = []
                for mode, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
                    for prefix, attn in impls.items():
                        if mode == "fwd":
                            step = lambda: attn(q, k, v, causal)
                        else:
                            step = lambda: torch.autograd.grad(attn(q, k, v, causal), (q, k, v), do)
                        tflops = mult * flops / (do_bench(step) * 1e-3) / 1e12
                        figures[f"kernels_{prefix}{mode}_tflops_{tag}"] = round(tflops, 1)
                        row.append(tflops)
                print(f"{T:>5} {D:>4} {str(causal):>6}  {row[0]:>7.1f} {row[1]:>7.1f}  "
                      f"{row[2]:>7.1f} {row[3]:>7.1f}")
    return figures


def bench_vqgan():
    """Images per second through the tiny preset's tokenizer, encode (image -> codes) and decode
    (codes -> image) separately, batch 64, at the threads bench.py runs with (one core by default).
    Speed does not depend on the weights, so a fresh model is timed."""
    import dataclasses
    import runpy

    import numpy as np
    import vqgan
    preset = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "tiny_cpu.py"))["vqgan"]
    cfg = vqgan.VQConfig(**{f.name: preset[f.name] for f in dataclasses.fields(vqgan.VQConfig) if f.name in preset})
    model = vqgan.VQModel(cfg).eval()
    images = np.random.default_rng(0).integers(0, 256, (64, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    codes = model.encode(images)
    figures = {}
    for name, fn in (("encode", lambda: model.encode(images)), ("decode", lambda: model.decode(codes))):
        fn()  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            fn()
            n += len(images)
        figures[f"vqgan_{name}_img_per_s"] = round(n / (time.perf_counter() - t0), 1)
    figures["vqgan_codes_per_image"] = int(codes[0].numel())
    return figures


def _median_times(fns, rounds):
    """Median wall time of each fn, timed in alternation (a, b, a, b, ...) so that a change in
    the other core's load on a shared machine hits both sides of a ratio alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def _bench_gpt_config():
    """The model these sections time: tiny-preset sized, defined here so the numbers do not move
    when a preset is retuned. 4 layers, 256 wide, 4 heads of 64, block 600 (one 64-code image of
    a 64x64 scene at f=8, a generated map, and text), vocab 1024 text + 15 special + 512 codes."""
    from model import GPTConfig
    return GPTConfig(block_size=600, vocab_size=1024 + 15 + 512, n_layer=4, n_head=4, n_embd=256)


def bench_model():
    """Training speed, fp32 on CPU: full steps (forward, backward, AdamW) on a batch of 8 x 600
    tokens; achieved FLOP/s (model.flops_per_token, attention included) divided by the FLOP/s of
    a torch.mm of the model's own MLP shape, (8*600, 256) @ (256, 1024), timed in the same process
    at the same thread count. Token content does not change speed, so random ids stand in. Then
    one Muon step on the same model, against its Newton-Schulz done one matrix part at a time."""
    import torch
    from model import GPT
    torch.manual_seed(0)
    config = _bench_gpt_config()
    B, T, C = 8, config.block_size, config.n_embd
    model = GPT(config).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    x = torch.randint(0, config.vocab_size, (B, T + 1))

    def step():
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    a, w = torch.randn(B * T, C), torch.randn(C, 4 * C)
    # warm-up; then repeat the matmul for about as long as a step takes, so that both sides of the
    # ratio share the machine's load alike (a short matmul can slip between a neighbour's slices)
    dt_step, dt_mm = _median_times([step, lambda: a @ w], 2)
    reps = max(1, round(dt_step / dt_mm))
    dt, dt_mm = _median_times([step, lambda: [a @ w for _ in range(reps)]], 7)
    train_flops, mm_flops = model.flops_per_token(T) * B * T / dt, reps * 2 * B * T * C * 4 * C / dt_mm
    # Muon's step on the same matrices (optim.Muon orthogonalises the parts of one shape in one
    # batched call), against the orthogonalisation alone done one part at a time
    import optim
    muon = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), optimizer="muon")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    parts = [u for p in muon.param_groups[0]["params"] for u in optim.split_parts(p, p.grad)]
    dt_muon, dt_parts = _median_times([muon.step, lambda: [optim.newton_schulz(u) for u in parts]], 7)
    return {"train_tok_per_s": round(B * T / dt), "train_gflop_per_s": round(train_flops / 1e9, 1),
            "matmul_gflop_per_s": round(mm_flops / 1e9, 1),
            "train_matmul_frac": round(train_flops / mm_flops, 3),
            "muon_step_ms": round(dt_muon * 1000, 1), "newton_schulz_one_by_one_ms": round(dt_parts * 1000, 1),
            "model_params": model.get_num_params(), "model_threads": torch.get_num_threads()}


def bench_sampler():
    """Generation speed with sampler.generate, greedy, fp32 on CPU, on the model of bench_model:
    (1) one 500-token prompt continued by 100 tokens (to 600), with the KV cache vs recomputing
    the full sequence every step (a plain argmax loop, no grammar: the most favourable case for
    recompute); (2) 8 prompts of 80..150 tokens, 128 new tokens each, in one batch vs one at a
    time, for this model and for the same with one key/value head (`batched_speedup_kv1`). Prompts are
    an image span plus random text; the models are untrained, so their replies wander through the
    grammar (images, tool calls) as a real rollout can. What bounds batching on
    a CPU: a decode step is memory-bound; batching shares the weight reads (14 MB) across rows,
    but every row still reads its own fp32 KV cache (~1.6 MB per row at 200 tokens) each step."""
    import dataclasses
    import itertools
    import torch
    import tokenizer
    from model import GPT
    from sampler import generate
    torch.manual_seed(0)
    config = _bench_gpt_config()
    # a stand-in for the trained tokenizer with the preset's 1024 text ids: bytes + letter pairs
    ranks = {bytes([i]): i for i in range(256)}
    for a, b in itertools.product(range(97, 123), range(97, 127)):
        if len(ranks) < 1024:
            ranks[bytes([a, b])] = len(ranks)
    tok = tokenizer.Tokenizer(ranks, codebook_size=512)
    assert tok.vocab_size == config.vocab_size
    model = GPT(config).eval()
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        image = (tok.image_offset + torch.randint(0, 512, (64,), generator=g)).tolist()
        text = torch.randint(0, tok.n_text, (n - 69,), generator=g).tolist()
        return [tok.bos, tok.user, tok.image_start] + image + [tok.image_end] + text + [tok.assistant]

    kw = dict(n_image_tokens=64, temperature=0)
    long_prompt = prompt(500)
    out = None

    def cached():
        nonlocal out
        out = generate(model, tok, [long_prompt], 100, **kw)

    cached()
    n_new = int(out.lengths[0])

    @torch.no_grad()
    def recompute():
        idx = torch.tensor([long_prompt])
        for _ in range(n_new):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    dt_recompute, dt_cache = _median_times([recompute, cached], 1)
    prompts = [prompt(n) for n in range(80, 151, 10)]

    def batch_times(m):
        """(seconds for the 8 prompts in one batch, one at a time; the batch's new tokens) on model m."""
        out = []
        times = _median_times([lambda: out.append(generate(m, tok, prompts, 128, **kw)),
                               lambda: [generate(m, tok, [p], 128, **kw) for p in prompts]], 3)
        return (*times, int(out[-1].lengths.sum()))

    dt_batched, dt_sequential, n_batch = batch_times(model)
    # the same with one key/value head for the four query heads, as the presets now have: each row's
    # cache is a quarter the size, and reading it is what batching cannot share
    dt_batched_kv1, dt_sequential_kv1, _ = batch_times(GPT(dataclasses.replace(config, n_kv_head=1)).eval())
    return {"sample_kv_tok_per_s": round(n_new / dt_cache, 1),
            "sample_recompute_tok_per_s": round(n_new / dt_recompute, 1),
            "kv_cache_speedup": round(dt_recompute / dt_cache, 1),
            "sample_batched_tok_per_s": round(n_batch / dt_batched, 1),
            "sample_sequential_tok_per_s": round(n_batch / dt_sequential, 1),
            "batched_speedup": round(dt_sequential / dt_batched, 2),
            "batched_speedup_kv1": round(dt_sequential_kv1 / dt_batched_kv1, 2),
            "sampler_threads": torch.get_num_threads()}


def bench_rl():
    """Rollout speed of RL at the tiny preset: the preset's rl settings (config/tiny_cpu.py: 4 train
    questions x 8 replies at temperature 1, tools on, up to 420 new tokens) drawn by rl.rollouts from
    the tiny preset's SFT model (out/stage2/ckpt.pt; bash runs/tiny_cpu.sh makes it), over a few
    iterations' questions. Then the same rollouts with every row prefilled on its own
    (sampler.generate's share_prefill=False) against one prefill a distinct prompt: the replies must
    be identical, and the ratio of the two times is what sharing the prefill saves."""
    import numpy as np
    import torch
    import batches
    import data
    import prepare
    import rl
    import sampler
    import trainer
    from configurator import configure
    cfg = configure(dict(vars(rl)), section="rl", argv=["config/tiny_cpu.py"])
    ckpt = rl.SFT_CHECKPOINTS["all"]
    if not os.path.exists(ckpt):
        raise SystemExit(f"bench rl times the tiny preset's SFT model {ckpt}: run bash runs/tiny_cpu.sh "
                         f"(or train_stage2.py) first")
    tok, _, codes, questions, _ = prepare.stage_data(cfg["data_dir"], cfg["vq_ckpt"], splits=("train",))
    model = trainer.load_model(ckpt)[0]
    rgb = data.load_split(cfg["data_dir"], "train")["rgb"] if model.config.reader_pixels else None
    n_image = codes["train"].shape[-1]
    rng = np.random.default_rng(0)
    picks = [[questions["train"][i] for i in rng.integers(len(questions["train"]), size=cfg["prompts_per_batch"])]
             for _ in range(3)]
    t0 = time.perf_counter()
    out = [rl.rollouts(model, tok, picked, codes["train"], n_image, cfg, seed, rgb) for seed, picked in enumerate(picks)]
    dt = time.perf_counter() - t0
    n_rollouts, n_tokens = sum(len(o[0]) for o in out), sum(int(o[2].lengths.sum()) for o in out)
    qs, prompts, gen, _, _ = out[0]
    kw = dict(max_new_tokens=cfg["max_new_tokens"], n_image_tokens=n_image, temperature=cfg["temperature"],
              tools=cfg["tools"] == "all", rgb=batches.scene_pictures(rgb, qs))
    times = {}
    for share in (True, False):
        t0 = time.perf_counter()
        again = sampler.generate(model, tok, prompts, seed=0, share_prefill=share, **kw)
        times[share] = time.perf_counter() - t0
        if not torch.equal(again.tokens, gen.tokens):
            raise AssertionError(f"share_prefill={share} changed the rollouts")
    return {"rl_rollouts_per_s": round(n_rollouts / dt, 2), "rl_rollout_tok_per_s": round(n_tokens / dt, 1),
            "rl_rollout_mean_len": round(n_tokens / n_rollouts, 1),
            "rl_prefill_speedup": round(times[False] / times[True], 2), "rl_threads": torch.get_num_threads()}


# --- learn: does a fresh model learn the task, and against what baselines? ----------------------
# python bench.py learn --arm=maps --minutes=5: every key below is a --key=value override. The
# defaults are the design that learns fastest so far (docs/experiments.md, "Shape is the missing
# percept"): objects nearer and only larger ones named, so their shape survives the VQ; a 4×128
# model with one key/value head for its four query heads, trained with Muon at a rate held, then
# falling over the last 40% ("The peak learning rate held …"); the object head, the
# depth head at a quarter of its loss, the referring loss and the pixel reader on the photo's own
# pixels ("The image reader on the question image's own pixels"); 7 questions an image;
# batches of 4 sequences (more steps for the same tokens: "Small batches" in the notes).
LEARN = dict(
    data_dir="data/learn",  # the tiny preset's scenes at 48 px, with 600 val scenes (~550 questions a category)
    far=6.0, min_visible=48,  # the scenes' settings (data.SceneConfig's defaults, the tiny preset's)
    vq_ckpt="out/vqgan_learn/ckpt.pt",  # its own VQ at vqgan.py's defaults, trained first if missing: the one its figures
    # were measured with (the tiny preset trains a shorter one, for its time)
    out_dir="out/learn",
    arm="rgb",  # rgb: direct VQA only (the Base arm); maps: + depth/seg generation and the PE chain (stage 1); blind: the blind baseline alone
    base_share=0.0,  # arm=maps, > 0: this share of the budget's tokens first trains VQA only without the seg head, as arm=rgb
    # does, and the rest trains the maps arm from those weights, the seg head added (the tiny preset's Base, then stage 1)
    blind=True,  # also train the blind baseline: the same VQA batches without the image
    minutes=30.0,  # the arm's training budget, timed from whole steps (evaluations and the blind baseline come on top)
    tokens=0,  # > 0: the budget in tokens instead
    evals=4,  # evaluations along the way
    per_category=400,  # val questions a category at each evaluation (s.e. <= 2.5 points)
    map_scenes=96,  # val scenes whose generated maps are scored (arm=maps); on 32 the figures moved by ±0.01–0.02
    vqa_weight=1.0, depth_weight=0.5, seg_weight=0.5, chain_weight=0.5,  # stage 1's mixture (arm=maps)
    questions_per_image=7,  # > 1: up to this many of a scene's questions after its one image (training only)
    practice="scene",  # packed questions from the question file, drawn fresh from the scene, or with drills (batches.py)
    practice_weights={},  # {category: w}: the fresh questions' categories drawn in proportion to w (1 if not named)
    even_counts=False,  # True: the fresh counting questions' counts drawn evenly, 3 and more as one, zeros as before (data.pick_question)
    branched=False,  # True: packed questions each see the image and only their own turn (batches.branched_row)
    map_questions=False,  # True: depth, seg and chain examples ask questions after their maps too (arm=maps; batches.py)
    map_noise=0.0,  # > 0: this share of the drawn maps' input codes replaced by random ones in training (batches.noisy_maps)
    n_layer=4, n_head=4, n_kv_head=1, n_embd=128, block_size=640, dropout=0.0, attn_impl="auto", grid_rope=True, grid_prior=6.0,
    code_patches=False,  # True: each code's mean pixel patch joins its embedding (model.py)
    object_head=True,  # True: a head names the object at each RGB place, its loss added (model.py)
    object_head_weight=1.0,  # the object head's loss is scaled by this (losses.py, "Place heads")
    depth_head=True,  # True: a head gives each RGB place's depth, binned, its loss added (model.py)
    depth_head_weight=0.25,  # the depth head's loss is scaled by this (losses.py, "Place heads")
    seg_head=False, seg_head_weight=1.0,  # True: a head names each RGB place's code of the seg map, its loss (times the weight) added (losses.py, "Place heads")
    anchor_head=False,  # True: a head names each object's class at the one place it covers most, its loss added (losses.py, "Place heads")
    anchor_head_weight=1.0,  # the anchor head's loss is scaled by this
    seg_head_hidden=0,  # > 0: the seg head is an MLP this wide (losses.py, "Place heads")
    seg_guidance=0.0,  # > 0 (with seg_head): seg maps drawn with the seg head's log-probabilities added, times this (sampler.generate)
    number_weight=1.0,  # > 0: a head regresses each number answer's log value, its loss scaled so (losses.py, "Numbers"); 0: none
    refer_heads=2,  # > 0: that many last-layer heads are taught to look at what each question names (losses.py, "Referring")
    pointer=False,  # True: what each referring head brings back must say where it looked (losses.py, "Referring")
    refer_layer=-1,  # the block whose heads the referring loss teaches (-1: the last)
    choose=False,  # True: the last head of the last layer is taught to copy a named answer's words from its option (losses.py, "Choosing")
    refer_options=False,  # True: at each multiple-choice option's name, the first referring head is taught to look at its object
    image_reader=True,  # True: the RGB is also read as pixels through a conv stem, VQ-decoded unless reader_pixels (model.py)
    reader_pixels=True,  # True: the reader reads the question image's own pixels, not its decoded codes (model.py)
    batch_size=4, grad_accum=1, learning_rate=1e-3, min_lr=1e-4, warmup_iters=20,
    warmdown=0.4,  # > 0: the peak lr held, then a straight fall to min_lr over this last share (trainer.lr_at); 0: cosine
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, optimizer="muon", muon_lr=0.05, seed=1337, device="auto", compile=False, log_interval=20,
    eval_iters=0, peak_tflops=0.0, init_from="scratch",
)
# arm=maps starts from these instead (any --key=value still overrides them): each measured in the maps
# arm at the default budget against the run without it (docs/experiments.md, the maps-arm entries of
# 2026-12-06 and 2026-12-07). map_questions: questions after the maps too, else the chain is
# untaught; the seg head, at 0.75 of its loss, guiding the seg maps drawn (seg matched 0.56 -> 0.61,
# counting lower as its weight rises); VQA examples at 2.5 (62.5% of the rows) and the number head at
# twice its weight: distance past blind + 0.20, which no maps-arm run without both reached.
MAPS_ARM = dict(map_questions=True, seg_head=True, seg_head_weight=0.75, seg_guidance=4.0,
                vqa_weight=2.5, number_weight=2.0)


def learn_config(argv=()):
    """bench.py learn's config: LEARN, then MAPS_ARM if the arm is maps, then argv's config files
    and --key=value overrides."""
    from configurator import configure
    doc = f"python bench.py learn [--key=value ...] (bench_learn). arm=maps starts from {MAPS_ARM} instead."
    cfg = configure(dict(LEARN, __doc__=doc), section="learn", argv=list(argv))
    if cfg["arm"] == "maps":
        cfg = configure({**LEARN, **MAPS_ARM}, section="learn", argv=list(argv))
    if cfg["arm"] not in ("rgb", "maps", "blind"):
        raise SystemExit(f"config error: arm must be rgb, maps or blind, got {cfg['arm']!r}")
    if not 0 <= cfg["base_share"] < 1 or (cfg["base_share"] > 0 and cfg["arm"] != "maps"):
        raise SystemExit(f"config error: base_share must be in [0, 1) and needs arm=maps, got {cfg['base_share']} with arm={cfg['arm']}")
    if cfg["seg_guidance"] > 0 and not cfg["seg_head"]:
        raise SystemExit("config error: seg_guidance > 0 needs seg_head=True (arm=maps sets both: "
                         "with --seg_head=False pass --seg_guidance=0 too)")
    return cfg


def bench_learn(argv=()):
    """Train a fresh model from scratch for a fixed budget and measure, at `evals` points, val
    accuracy per category (direct answers, eval.direct_scores) against that category's chance
    (metrics.chance_scorer: majority or median of the train answers, uniform over choices) and a
    blind baseline trained on the same VQA batches with the image removed: the floor that answer
    priors alone reach. Writes out_dir/learn_curve.png and the learn_* figures."""
    import numpy as np
    import torch

    import batches
    import data
    import eval as ev
    import metrics
    import prepare
    import trainer
    from report import line_chart
    cfg = learn_config(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1))))
    t_start = time.time()
    data.prepare(cfg["data_dir"], n_val=600, n_test=200, far=cfg["far"], min_visible=cfg["min_visible"])  # built once
    tok, vq, codes, questions, _ = prepare.stage_data(cfg["data_dir"], cfg["vq_ckpt"])
    patches = prepare.code_patches(cfg["data_dir"], vq, codes["train"]) if cfg["code_patches"] else None
    n_image = codes["train"].shape[-1]
    targets = {k: cfg[k] for k in ("object_head", "depth_head", "refer_heads", "seg_head", "anchor_head")}
    reads_pixels = trainer.reads_pixels(cfg)
    splits = {s: data.load_split(cfg["data_dir"], s)  # each split read once: for the place labels or pixels, val for the maps
              for s in ("train", "val") if any(targets.values()) or reads_pixels or (s == "val" and cfg["arm"] == "maps")}
    rgb = {s: sp["rgb"] for s, sp in splits.items()} if reads_pixels else None
    val_rgb = None if rgb is None else rgb["val"]
    scenes = {s: splits[s]["scenes"] if s in splits else data.load_scenes(cfg["data_dir"], s) for s in ("train", "val")}
    places, coverage = batches.place_targets(splits, n_image, **targets, codes=codes)
    # the VQA-only first part (base_share > 0) trains no seg head, so its rows carry no seg labels
    base_places = batches.place_targets(splits, n_image, **dict(targets, seg_head=False), codes=codes)[0]
    cats = sorted({q["category"] for q in questions["val"]})
    eval_qs = ev.balanced_sample(questions["val"], cfg["per_category"] * len(cats))
    drilled = {}
    if cfg["practice"] == "drills":  # the ladder's rungs no question file asks: existence and pointing, by kind
        drilled = {s: [dict(q, scene=i, category=q["kind"]) for i, g in enumerate(scenes[s])
                       for qs in data.drill_questions(g).values() for q in qs] for s in ("train", "val")}
        eval_qs += ev.balanced_sample(drilled["val"], cfg["per_category"] * len(data.DRILLS))
    chance = metrics.chance_scorer(questions["train"] + drilled.get("train", []))
    by_cat = {c: [k for k, q in enumerate(eval_qs) if q["category"] == c] for c in cats + (list(data.DRILLS) if drilled else [])}
    weights = {"vqa": cfg["vqa_weight"]}
    if cfg["arm"] == "maps":
        weights.update(depth=cfg["depth_weight"], seg=cfg["seg_weight"], chain=cfg["chain_weight"])
    run = trainer.setup_run(cfg["device"])
    val_split = splits.get("val") if cfg["arm"] == "maps" else None

    def batch_maker(blind, seen, vqa_only=False):
        """The get_batch of an arm (blind: VQA only, no image; vqa_only: VQA only, without the seg head's
        labels), counting the train tokens and answers (<answer> tokens: a maps row spends more tokens
        an answer than a VQA row) in seen."""
        batch = batches.stage1_batches(tok, codes, questions, scenes, cfg, {"vqa": 1.0} if blind or vqa_only else weights,
                                       base_places if vqa_only else places, coverage, blind, rgb)

        def get_batch(split, rng):
            b = batch(split, rng)
            if split == "train":
                seen["tokens"] += b[0].numel()
                seen["answers"] += int((b[0] == tok.answer).sum())
            return b
        return get_batch

    def train_arm(name, blind, max_iters, evals=cfg["evals"], seen=None, curve=None, vqa_only=False, **overrides):
        """Train one model; returns its curve [{iter, tokens, answers, acc_<cat>}] and the loop's last metrics.
        A second part of a run passes the first's seen and curve, to go on counting and drawing them."""
        c = dict(cfg, **overrides, out_dir=os.path.join(cfg["out_dir"], name), max_iters=max_iters,
                 eval_interval=-(-max_iters // evals))  # the last evaluation is the run's final one
        seen = {"tokens": 0, "answers": 0} if seen is None else seen
        get_batch = batch_maker(blind, seen, vqa_only)
        curve = [] if curve is None else curve

        def evaluate(model, it):
            model.eval()
            sc = ev.direct_scores(model, tok, eval_qs, codes["val"], n_image, blind=blind, rgb=val_rgb)
            out = {f"acc_{cat}": float(np.mean([sc[k] for k in ks])) for cat, ks in by_cat.items()}
            out["vqa_acc"] = float(np.mean([out[f"acc_{cat}"] for cat in cats]))  # the question file's categories
            if not blind and not vqa_only and cfg["arm"] == "maps":
                maps, _ = ev.map_quality(model, tok, vq, val_split, codes["val"], range(cfg["map_scenes"]), n_image, **ev.DECODE)
                out.update(map_object_depth_absrel=maps["object_depth_absrel"], map_seg_miou_matched=maps["seg_miou_matched"])
            model.train()
            curve.append({"iter": it, "tokens": seen["tokens"], "answers": seen["answers"], **out})
            return out

        torch.manual_seed(c["seed"])
        model, optimizer, start = trainer.init_model(c, run, tok, n_image, patches, vq)
        return curve, trainer.train(c, run, model, optimizer, start, get_batch, evaluate)

    def per_iter_tokens(get_batch, rng):
        # 1000 sampled batches (~7 s): a batch's size varies with its kind (s.d. ~30% of the mean in the
        # maps arm), and 20 of them once planned a run 7% over its token budget
        return np.mean([get_batch("train", rng)[0].numel() for _ in range(1000)]) * cfg["grad_accum"]

    # the budget in iterations: tokens / mean batch size, or minutes / the measured step time
    rng, get_batch = np.random.default_rng([cfg["seed"], 9]), batch_maker(False, {"tokens": 0, "answers": 0})
    per_iter = per_iter_tokens(get_batch, rng)
    if cfg["tokens"] > 0:
        max_iters = max(cfg["evals"], round(cfg["tokens"] / per_iter))
    else:
        # whole training steps, as the loop takes them: the batch built (with its place targets), the
        # losses, backward and the optimizer (timing forward and backward alone came out ~1.6x short)
        torch.manual_seed(cfg["seed"])
        model, optimizer, _ = trainer.init_model(dict(cfg, out_dir=cfg["out_dir"]), run, tok, n_image, patches, vq)
        times = []
        for _ in range(8):
            t0 = time.time()
            for _ in range(cfg["grad_accum"]):
                b = get_batch("train", rng)
                trainer.lm_loss(model, trainer.to_device(b, run.device))[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.time() - t0)
        step = float(np.median(times[2:]))  # the first steps warm up
        max_iters = max(cfg["evals"], round(cfg["minutes"] * 60 / step))
        del model, optimizer
    print(f"learn: arm {cfg['arm']}, {max_iters} iterations (~{max_iters * per_iter / 1e6:.2f}M tokens), "
          f"{len(eval_qs)} val questions ({cfg['per_category']} a category)")
    vqa_iters = max_iters * cfg["vqa_weight"] / sum(weights.values())  # the VQA batches among them
    if cfg["base_share"] > 0:  # the budget's tokens split: the first part's batches are VQA only (shorter)
        base_iters = max(1, round(cfg["base_share"] * max_iters * per_iter
                                  / per_iter_tokens(batch_maker(False, {"tokens": 0, "answers": 0}, True), rng)))
        maps_iters = max(cfg["evals"], round((1 - cfg["base_share"]) * max_iters))
        print(f"learn: base_share {cfg['base_share']}: {base_iters} VQA-only iterations, then {maps_iters} of the maps arm")
        curve, _ = train_arm("maps_base", False, base_iters, evals=max(1, round(cfg["evals"] * cfg["base_share"])),
                             vqa_only=True, seg_head=False, seg_guidance=0.0)
        seen = {k: curve[-1][k] for k in ("tokens", "answers")}
        curve, last = train_arm(cfg["arm"], False, maps_iters, seen=seen, curve=curve,
                                init_from=os.path.join(cfg["out_dir"], "maps_base", "ckpt.pt"))
        last["tokens"] = seen["tokens"]  # both parts'
        vqa_iters = base_iters + maps_iters * cfg["vqa_weight"] / sum(weights.values())
        max_iters = base_iters + maps_iters
    else:  # arm=blind: the baseline alone, for as many iterations as the rgb arm would train
        curve, last = train_arm(cfg["arm"], cfg["arm"] == "blind", max_iters)
    minutes = (time.time() - t_start) / 60
    blind_last = {}
    if cfg["blind"] and cfg["arm"] != "blind":  # as many VQA batches as the arm saw
        _, blind_last = train_arm("blind", True, max(cfg["evals"], round(vqa_iters)))

    key = "learn_blind_" if cfg["arm"] == "blind" else "learn_"  # a blind arm alone keeps the rgb arm's keys in bench.json
    out = {"learn_arm": cfg["arm"], f"{key}tokens": last["tokens"], f"{key}answers": curve[-1]["answers"], f"{key}iters": max_iters,
           f"{key}minutes": round(minutes, 2), "learn_questions_per_category": min(len(v) for v in by_cat.values())}
    print(f"\n{'category':<18}{'chance':>8}{'blind':>8}{'arm':>8}   (val, direct answers)")
    for cat in by_cat:
        ch = float(np.mean([chance(eval_qs[k]) for k in by_cat[cat]]))
        out[f"{key}{cat}"] = round(last[f"acc_{cat}"], 4)
        out[f"learn_chance_{cat}"] = round(ch, 4)
        if blind_last:
            out[f"learn_blind_{cat}"] = round(blind_last[f"acc_{cat}"], 4)
        print(f"{cat:<18}{ch:>8.3f}{blind_last.get(f'acc_{cat}', float('nan')):>8.3f}{last[f'acc_{cat}']:>8.3f}")
    for k in ("map_object_depth_absrel", "map_seg_miou_matched"):
        if k in last:
            out[f"learn_{k}"] = round(last[k], 4)
    out[f"{key}curve"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in curve]
    series = {cat: [(r["tokens"] / 1e6, r[f"acc_{cat}"] - out[f"learn_chance_{cat}"]) for r in curve] for cat in by_cat}
    png = os.path.join(cfg["out_dir"], "learn_curve.png")
    line_chart(png, series, f"{cfg['arm']}: accuracy - chance by M tokens", size=(480, 260))
    print(f"wrote {png}")
    return out


SECTIONS = {"data": bench_data, "vqgan": bench_vqgan, "kernels": bench_kernels,
            "model": bench_model, "sampler": bench_sampler, "rl": bench_rl, "learn": bench_learn}


def main(argv):
    names = [a for a in argv if not a.startswith("-")]
    options = [a for a in argv if a.startswith("-")]  # --key=value (or --help) for the learn section
    bad = [n for n in names if n not in SECTIONS]
    if not names or bad or (options and names != ["learn"]):
        if bad:
            print(f"unknown section(s): {', '.join(bad)}")
        elif options and names:
            print("--key=value options (and --help) go with the learn section alone")
        print(f"usage: python bench.py SECTION [SECTION ...]   sections: {', '.join(SECTIONS)}\n"
              f"       python bench.py learn [--key=value ...]   (python bench.py learn --help lists the keys)")
        return 0 if not names and options in ([], ["--help"], ["-h"]) else 2
    results = {}
    for name in names:
        figures = SECTIONS[name](options) if name == "learn" else SECTIONS[name]()
        print(f"\n== {name} ==")
        width = max(len(k) for k in figures)
        for k, v in figures.items():
            print(f"{k:<{width}}  {v}")
        results.update(figures)
    path = "bench.json"
    merged = json.load(open(path)) if os.path.exists(path) else {}
    merged.update(results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    print("final: " + json.dumps(results))
    return 0


if __name__ == "__main__":
    # one core, as the targets are stated; a section may raise it for its own measurement
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    sys.exit(main(sys.argv[1:]))
