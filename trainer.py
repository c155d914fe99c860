"""
The one training loop every stage uses (stage 1, stage 2 SFT; RL reuses its machinery).

A stage script defines its data as `get_batch(split, rng) -> (idx, targets, loss_mask)` and
hands it to `train`, which does what nanoGPT's train.py does, once, for everyone:
  - DDP through torchrun (NCCL on CUDA, gloo on CPU); the global micro-batches of an iteration
    are split across ranks, and gradients sync only on each rank's last micro-step;
  - bf16 autocast on CUDA, fp32 on CPU; optional torch.compile;
  - cosine learning rate with warm-up; gradient clipping; periodic val loss and a stage hook
    (samples, pictures, metrics);
  - a log line with loss, lr, ms/iter, tokens/s, MFU and ETA, and metrics.jsonl for plots;
  - an atomic checkpoint (temp file, fsync, rename) that `torch.load(weights_only=True)` reads;
  - exact resume: batches are a pure function of (seed, iteration, micro-step), so restoring
    weights, optimizer, iteration and torch RNG continues the run bit for bit;
  - a NaN/inf loss or gradient stops the run with a message and leaves the last good checkpoint.

RL (rl.py) brings its own objective through the same loop: `loss_fn(model, batch) -> (loss, stats)`
replaces the next-token loss, `get_batch` may return extra items after the three tensors (rollout
advantages, old log-probs, reward statistics), the stats (floats) join the log line and
metrics.jsonl, and `steps_per_batch` takes several optimizer steps on each iteration's batches.

The loop reads its settings from the script's config dict: out_dir, init_from, seed, device,
compile, attn_impl, max_iters, batch_size, grad_accum, learning_rate, min_lr, warmup_iters, warmdown (optional),
weight_decay, beta1, beta2, grad_clip, log_interval, eval_interval, eval_iters, peak_tflops, and
for a model trained from scratch n_layer, n_head, n_kv_head (optional), n_embd, block_size, dropout, grid_rope,
grid_prior. Each stage script sets them at its top, where `--help` lists them.
"""
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import grounding

from model import GPT, GPTConfig

# --- the run: devices, ranks, precision ------------------------------------------------------------
@dataclass
class Run:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    device_type: str
    master: bool

    def autocast(self):
        # bf16 on CUDA keeps fp32 range, so no loss scaling; CPU trains in fp32
        if self.device_type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def setup_run(device="auto"):
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and join the process group."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if ddp:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        if cuda:
            torch.cuda.set_device(local_rank)
        else:  # ranks on one CPU share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    else:
        rank, local_rank, world = 0, 0, 1
    dev = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(ddp, rank, local_rank, world, dev, "cuda" if cuda else "cpu", rank == 0)


def peak_flops(run, configured_tflops):
    """The FLOP/s that MFU is measured against: configured, a GPU's bf16 datasheet peak, or on a
    CPU this process's own measured fp32 matmul rate (so MFU says how close to matmul speed we train)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if run.device_type == "cuda":
        name = torch.cuda.get_device_name()
        return next((v for k, v in {"H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}.items() if k in name), 100e12)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(5):  # best of several: a busy moment on a shared machine must not lower the peak
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t0))
    return best


def lr_at(it, cfg):
    """Linear warm-up, then cosine decay to min_lr at max_iters; or, with cfg["warmdown"] > 0, the
    peak held until that last share of the run and a straight fall to min_lr over it (the
    trapezoid nanochat and modded-nanogpt use for short runs)."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / cfg["warmup_iters"]
    if cfg.get("warmdown", 0) > 0:
        left = (cfg["max_iters"] - it) / max(1, cfg["warmdown"] * cfg["max_iters"])
        return cfg["min_lr"] + min(1.0, max(left, 0.0)) * (cfg["learning_rate"] - cfg["min_lr"])
    progress = (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg["learning_rate"] - cfg["min_lr"])


# --- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(path, payload):
    """Write to a temp file, fsync, then rename over the old checkpoint: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=device, weights_only=True)


def model_config(model_args, path):
    """GPTConfig from a checkpoint's model_args, or a clear error if model.py no longer has one
    of its settings (a checkpoint of another version: old checkpoints need not load)."""
    unknown = sorted(set(model_args) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"checkpoint {path} was saved by another version of model.py: GPTConfig has no "
                         f"{', '.join(unknown)}; train it again, or check out the commit that wrote it")
    return GPTConfig(**model_args)


def load_model(path, device="cpu", attn_impl=None):
    """A trained model from a ckpt.pt, in eval mode (for sampling and evaluation)."""
    ckpt = load_checkpoint(path, device)
    args = dict(ckpt["model_args"], **({"attn_impl": attn_impl} if attn_impl else {}))
    model = GPT(model_config(args, path))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def reads_pixels(cfg):
    """Whether a model built from cfg reads its question images' own pixels: reader_pixels says how
    the image reader reads, so without image_reader there is nothing that reads them."""
    return bool(cfg.get("image_reader") and cfg.get("reader_pixels"))


# How much each loss counts, and how strongly the seg head guides drawing, are training settings, not
# the model: a stage that starts from another's weights takes them from its own config where that
# sets them (train_stage1.py does; stage 2 and RL keep the checkpoint's). Which heads exist is the
# model: they come with the weights, and a next stage may add one (stage 1 adds the seg head to Base,
# which draws no maps) but not drop one.
LOSS_SETTINGS = ("object_head_weight", "depth_head_weight", "seg_head_weight", "anchor_head_weight",
                 "number_weight", "seg_guidance")
HEADS = {"object_head": "object_classes", "depth_head": "depth_bins", "seg_head": "seg_codes",
         "anchor_head": "anchor_classes"}  # config flag -> the GPTConfig size that is 0 without the head


def head_sizes(tok):
    """Each place head's number of classes (HEADS' GPTConfig sizes) for this tokenizer's codebook."""
    return {"object_classes": grounding.N_OBJECT_CLASSES, "depth_bins": grounding.N_DEPTH_BINS,
            "seg_codes": tok.codebook_size, "anchor_classes": grounding.N_OBJECT_CLASSES}


def next_stage_args(model_args, cfg, path, sizes):
    """(model_args, added): the checkpoint's model_args with cfg's loss settings (LOSS_SETTINGS) where
    cfg has them and with the heads cfg turns on that the checkpoint lacks (of sizes, head_sizes(tok));
    added names those, which start from scratch. A clear error where cfg turns off a head the
    checkpoint has, or the number head on or off (it is there iff number_weight > 0)."""
    args, added = dict(model_args), []
    for flag, size in HEADS.items():
        if flag in cfg and not cfg[flag] and args.get(size):
            raise ValueError(f"{path} was trained with the {flag.replace('_', ' ')}, but this run sets {flag}={cfg[flag]}: "
                             f"heads come with the weights, so set {flag}=True or train the earlier stage again")
        if cfg.get(flag) and not args.get(size):
            args[size] = sizes[size]
            added.append(flag)
    if "seg_head" in added:
        args["seg_head_hidden"] = int(cfg.get("seg_head_hidden", 0))
    for key in LOSS_SETTINGS:
        if key in cfg:
            if key == "number_weight" and (float(cfg[key]) > 0) != (args.get(key, 0.0) > 0):
                raise ValueError(f"{path} was trained {'with' if args.get(key, 0.0) > 0 else 'without'} the number head "
                                 f"(number_weight {args.get(key, 0.0)}), but this run sets number_weight={cfg[key]}: "
                                 "heads come with the weights, so keep it on (> 0) or off (0) as it was")
            args[key] = float(cfg[key])
    return args, added


def init_model(cfg, run, tok, n_image_tokens, code_patches=None, vq=None):
    """(model, optimizer, start) from init_from: scratch, resume (out_dir/ckpt.pt), or the
    path of a previous stage's checkpoint (weights only; a fresh optimizer and schedule). The
    tokenizer and the codes per image fix the vocabulary and the image layout. code_patches
    (vqgan.code_patches) gives a model from scratch what each code looks like, and with
    image_reader=True the VQ tokenizer vq gives it the decoder its image reader reads through; a
    checkpoint carries both."""
    ckpt, init, added, sizes = None, cfg["init_from"], [], head_sizes(tok)
    if init == "resume":
        ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), run.device)
        model_args = ckpt["model_args"]
    elif init != "scratch":
        ckpt = load_checkpoint(init, run.device)
        model_args, added = next_stage_args(ckpt["model_args"], cfg, init, sizes)
    else:
        if cfg.get("image_reader") and vq is None:
            raise ValueError("image_reader=True reads images through the VQ decoder: pass init_model the VQ tokenizer (vq=)")
        if "n_layer" not in cfg:
            raise SystemExit("init_from=scratch: this script sets no model shape (n_layer, …); "
                             "it starts from a previous stage's checkpoint")
        model_args = dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_kv_head=int(cfg.get("n_kv_head", 0)),
                          n_embd=cfg["n_embd"], block_size=cfg["block_size"],
                          dropout=cfg["dropout"], vocab_size=tok.vocab_size, attn_impl=cfg["attn_impl"], grid_rope=cfg["grid_rope"], grid_prior=cfg["grid_prior"],
                          image_offset=tok.image_offset, n_image_tokens=n_image_tokens,
                          code_patch_dim=0 if code_patches is None else code_patches.shape[1],
                          object_head_weight=float(cfg.get("object_head_weight", 1.0)),
                          depth_head_weight=float(cfg.get("depth_head_weight", 1.0)),
                          reader_vq=asdict(vq.cfg) if cfg.get("image_reader") else None,
                          reader_pixels=reads_pixels(cfg),
                          pointer=bool(cfg.get("pointer")), refer_layer=int(cfg.get("refer_layer", -1)),
                          number_weight=float(cfg.get("number_weight", 0.0)),
                          seg_head_weight=float(cfg.get("seg_head_weight", 1.0)),
                          seg_head_hidden=int(cfg.get("seg_head_hidden", 0)),
                          anchor_head_weight=float(cfg.get("anchor_head_weight", 1.0)),
                          seg_guidance=float(cfg.get("seg_guidance", 0.0)),
                          **{size: sizes[size] if cfg.get(flag) else 0 for flag, size in HEADS.items()})
    layout = dict(vocab_size=tok.vocab_size, image_offset=tok.image_offset, n_image_tokens=n_image_tokens)
    for key, value in layout.items():
        if model_args.get(key) != value:
            raise ValueError(f"checkpoint {key} {model_args.get(key)} != this data's {value}: "
                             "was it trained with another tokenizer or VQ codebook?")
    model_args = dict(model_args, attn_impl=cfg["attn_impl"])
    model = GPT(model_config(model_args, os.path.join(cfg["out_dir"], "ckpt.pt") if init == "resume" else init))
    if ckpt is not None:
        # an added head keeps the fresh weights the model was built with; every other weight must load
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or any(k.split(".")[0] not in added for k in missing):
            raise ValueError(f"{init} does not fit this model: missing {missing}, unexpected {unexpected}")
    else:
        if code_patches is not None:
            model.code_patches.copy_(torch.as_tensor(code_patches))
        if model.config.reader_vq:
            model.reader.load_vq(vq)
    model.to(run.device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                           cfg["optimizer"], cfg["muon_lr"])
    start = {"iter": 0, "tokens": 0}  # where the loop starts: iteration and tokens trained so far
    if init == "resume":
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise SystemExit(f"cannot resume {cfg['out_dir']}/ckpt.pt with optimizer={cfg['optimizer']}: its optimizer "
                             f"state does not fit ({e}); resume with the optimizer it was trained with") from None
        start = {"iter": ckpt["iter_num"], "tokens": ckpt["tokens_seen"]}
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if run.device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        print(f"resuming from {cfg['out_dir']}/ckpt.pt at iteration {start['iter']}")
    elif ckpt is not None:
        print(f"initialised from {init} (iteration {ckpt['iter_num']} of that run)"
              + "".join(f"; the {h.replace('_', ' ')} is new, from scratch" for h in added))
    return model, optimizer, start


class NonFiniteLoss(RuntimeError):
    pass


# --- the loop ------------------------------------------------------------------------------------
def lm_loss(model, batch):
    """The default objective: masked next-token cross entropy (plus the place heads', when the
    batch brings their labels), no extra statistics. A fourth item is the model's keyword tensors
    (batches.stage1_batch: places, branches)."""
    x, y, m, *extra = batch
    return model(x, y, m, **(extra[0] if extra else {}))[1], {}


def train(cfg, run, model, optimizer, start, get_batch, evaluate=None, refs=None, loss_fn=lm_loss, steps_per_batch=1):
    """Train from start (init_model's) to cfg["max_iters"]. evaluate(model, iter_num) -> dict of metrics runs on
    the master at each eval interval; refs (tokenizer, VQ, data paths, stage) go into the checkpoint.
    loss_fn(model, batch) -> (loss, {name: float}) gets each batch get_batch returns (its tensors on
    the device; batch[0] is the (B, T) input ids); the stats are averaged over micro-batches, steps
    and ranks and logged. steps_per_batch > 1 fetches an iteration's batches once and takes that
    many optimizer steps on them (PPO-style epochs). eval_iters=0 skips the val loss.
    Returns the last logged metrics, with "tokens": all tokens trained on, over all ranks. Raises NonFiniteLoss (after saying so) on a NaN/inf loss."""
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if run.ddp:
        # A place head or the pointer trains only on batches that bring its labels (none in stage 2
        # and RL), and DDP otherwise waits for every parameter's gradient; the search for unused
        # ones costs a walk of the autograd graph an iteration, so it is on only for such models.
        unused = bool(raw_model.place_heads() or raw_model.config.pointer)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.local_rank] if run.device_type == "cuda" else None,
                                                          find_unused_parameters=unused)
    if cfg["grad_accum"] % run.world_size:
        raise ValueError(f"grad_accum={cfg['grad_accum']} must be a multiple of the {run.world_size} ranks")
    accum = cfg["grad_accum"] // run.world_size
    out_dir, ckpt_path = cfg["out_dir"], os.path.join(cfg["out_dir"], "ckpt.pt")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    peak = peak_flops(run, cfg["peak_tflops"])
    start_iter, tokens_seen = start["iter"], start["tokens"]
    if run.master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        _truncate_metrics(metrics_path, start_iter)
        print(f"training {raw_model.get_num_params() / 1e6:.2f}M parameters on {run.world_size}×{run.device}, "
              f"iterations {start_iter}→{cfg['max_iters']}, {cfg['grad_accum']}×{cfg['batch_size']} sequences an iteration")

    def batch(split, seed_parts):
        return to_device(get_batch(split, np.random.default_rng([cfg["seed"], *seed_parts])), run.device)

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        for k in range(cfg["eval_iters"]):
            b = batch("val", [1, k, run.rank])  # the same val batches at every evaluation
            with run.autocast():
                losses.append(loss_fn(model, b)[0].item())
        model.train()
        loss = torch.tensor(np.mean(losses), device=run.device)
        if run.ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item()

    model.train()
    last, t_start, t_last, tokens, flops = {}, time.time(), time.time(), 0, 0.0
    for it in range(start_iter, cfg["max_iters"]):
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # a pure function of the step: exact resume
        batches = [batch("train", [0, it, run.rank * accum + micro]) for micro in range(accum)]
        loss_vals, stats_sum = [], {}
        for _ in range(steps_per_batch):
            loss_sum = torch.zeros((), device=run.device)
            for micro, b in enumerate(batches):
                x = b[0]
                if run.ddp:
                    model.require_backward_grad_sync = micro == accum - 1  # all-reduce once per optimizer step
                with run.autocast():
                    loss, stats = loss_fn(model, b)
                (loss / accum).backward()
                loss_sum += loss.detach()
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                tokens += x.numel()
                tokens_seen += x.numel() * run.world_size
                flops += raw_model.flops_per_token(x.shape[1]) * x.numel()
            if run.ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf)
            loss_vals.append(loss_sum.item() / accum)
            if not (math.isfinite(loss_vals[-1]) and math.isfinite(grad_norm.item())):
                optimizer.zero_grad(set_to_none=True)
                msg = (f"non-finite {'loss' if not math.isfinite(loss_vals[-1]) else 'gradient'} at iteration {it}: stopping. "
                       + (f"The last good checkpoint is {ckpt_path}." if os.path.exists(ckpt_path) else "No checkpoint was written yet."))
                if run.master:
                    print(msg)
                raise NonFiniteLoss(msg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_val = sum(loss_vals) / steps_per_batch
        stats = _mean_stats(stats_sum, accum * steps_per_batch, run)
        done = it + 1
        if run.master and (done % cfg["log_interval"] == 0 or done == cfg["max_iters"]):
            now = time.time()
            dt = now - t_last
            n_iters = done - (last.get("iter") or start_iter)
            tok_s, mfu = tokens * run.world_size / dt, flops / dt / peak  # every rank does the same work
            eta = (now - t_start) / (done - start_iter) * (cfg["max_iters"] - done)
            print(f"iter {done}/{cfg['max_iters']} | loss {loss_val:.4f} | lr {lr:.2e} | {1000 * dt / n_iters:.0f} ms/iter "
                  f"| {tok_s:,.0f} tok/s | mfu {100 * mfu:.1f}% | eta {_fmt_time(eta)}"
                  + "".join(f" | {k} {v:.4g}" for k, v in stats.items()))
            last = {"iter": done, "loss": loss_val, "lr": lr, "ms_per_iter": 1000 * dt / n_iters,
                    "tok_per_s": tok_s, "mfu": mfu, "grad_norm": grad_norm.item(), **stats}
            _append(metrics_path, last)
            t_last, tokens, flops = now, 0, 0.0
        if done % cfg["eval_interval"] == 0 or done == cfg["max_iters"]:
            t_eval = time.time()
            record = {"iter": done, **({"val_loss": val_loss()} if cfg["eval_iters"] > 0 else {})}
            if run.master:
                if evaluate is not None:
                    record.update(evaluate(raw_model, done))
                print("eval " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
                _append(metrics_path, record)
                save_checkpoint(ckpt_path, {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "model_args": asdict(raw_model.config), "iter_num": done, "tokens_seen": tokens_seen,
                    "val_loss": record.get("val_loss"),
                    "config": cfg, "refs": refs or {},
                    "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if run.device_type == "cuda" else None},
                })
            last = {**last, **record, "tokens": tokens_seen}
            if run.ddp:
                dist.barrier()  # no rank runs ahead of the checkpoint
            t_last += time.time() - t_eval  # ms/iter and tok/s measure training, not evaluation
    return last


def to_device(obj, device):
    """A batch's tensors, wherever they sit in tuples, lists and dicts, moved to the device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _mean_stats(sums, n, run):
    """Per-iteration statistics from loss_fn: the mean over micro-batches and steps, then over ranks."""
    if not sums:
        return {}
    keys = sorted(sums)
    v = torch.tensor([sums[k] / n for k in keys], dtype=torch.float64, device=run.device)
    if run.ddp:
        dist.all_reduce(v, op=dist.ReduceOp.AVG)
    return dict(zip(keys, v.tolist()))


def _append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path, start_iter):
    """On resume, drop what the interrupted run logged after its last checkpoint."""
    if not os.path.exists(path):
        return
    keep = [line for line in open(path) if json.loads(line).get("iter", 0) <= start_iter] if start_iter else []
    with open(path, "w") as f:
        f.writelines(keep)


def _fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"
