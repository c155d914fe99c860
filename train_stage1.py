"""
Stage 1 (COOPER §3.1): spatial VQA plus auxiliary modality generation.

The model learns, in one vocabulary and with one next-token loss, to
  (a) answer spatial questions directly:            RGB, question -> <answer>…</answer>
  (b) draw a depth map on the paper's instruction:   RGB, <depth-estimation>…</depth-estimation> -> map
  (c) draw a segmentation map likewise:              RGB, <segmentation>…</segmentation> -> map
  (d) answer with its maps in context, the way the PE arm is judged: RGB -> depth -> seg -> question -> answer
Loss falls only on what the assistant says. `--aux=False` trains the Base arm on the same VQA
examples (a) alone; `--token_budget=N` sizes a run by tokens instead of iterations (a Base run
with the same total tokens as stage 1 tells whether a gain is more than extra compute).

    python train_stage1.py                           # tiny preset; builds data, tokenizer and VQ codes if missing
    python train_stage1.py --aux=False --out_dir=out/base
    torchrun --standalone --nproc_per_node=8 train_stage1.py config/full_gpu.py
"""
import json
import os
import time

import numpy as np
import torch

import conversations
import data
import eval as ev
import tokenizer
import trainer
import vqgan
from configurator import configure

# -----------------------------------------------------------------------------
globals().update(trainer.LOOP_DEFAULTS)  # the shared loop's keys: out_dir, max_iters, learning_rate, …
out_dir = "out/stage1"
data_dir = "data/tiny"
vq_ckpt = "out/vqgan/ckpt.pt"
aux = True  # False: the Base arm (direct VQA only)
# the mixture: relative weights of the example kinds (a)-(d) above
vqa_weight = 1.0
depth_weight = 0.5
seg_weight = 0.5
chain_weight = 0.5
token_budget = 0  # > 0: set max_iters so the run trains on about this many tokens
eval_scenes = 32  # val scenes whose generated maps are scored at each evaluation
eval_questions = 140  # val questions (balanced over categories) answered at each evaluation (eval.DECODE)
max_iters = 250
eval_interval = 250
block_size = 640  # the longest tiny-preset example (RGB, depth, seg, five lettered options, answer) is ~520 tokens
# -----------------------------------------------------------------------------


def load_stage_data(data_dir, vq_ckpt, splits=("train", "val")):
    """Builds what is missing (dataset, tokenizer, VQ and codes), then loads the tokenizer, VQ,
    codes and questions. Shared by every stage that trains the transformer."""
    vqgan.ensure_codes(data_dir, vq_ckpt)
    vq = vqgan.load_vqgan(vq_ckpt)
    tok_path = os.path.join(data_dir, "tokenizer.tiktoken")
    if not os.path.exists(tok_path):
        print(f"no tokenizer at {tok_path}: training one (python tokenizer.py)")
        tokenizer.build_tokenizer(data_dir, 1024, vq.cfg.codebook_size, tok_path)
    tok = tokenizer.Tokenizer.load(tok_path, vq.cfg.codebook_size)
    codes = {s: vqgan.load_codes(data_dir, s).astype(np.int64) for s in splits}
    questions = {s: data.load_questions(data_dir, s) for s in splits}
    refs = {"tokenizer": tok_path, "vq": vq_ckpt, "data_dir": data_dir}
    return tok, vq, codes, questions, refs


def make_batch(tok, rows, block_size):
    """[(ids, mask)] -> right-padded (idx, targets, loss_mask) tensors, trimmed to the longest row."""
    longest = max(len(ids) for ids, _ in rows)
    if longest > block_size + 1:
        raise ValueError(f"an example of {longest} tokens does not fit block_size {block_size}: raise block_size")
    x = torch.full((len(rows), longest), tok.pad, dtype=torch.long)
    m = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        x[r, :len(ids)], m[r, :len(mask)] = torch.tensor(ids), torch.tensor(mask)
    return x[:, :-1], x[:, 1:], m[:, 1:]  # the mask belongs to the token being predicted


def stage1_batch(tok, codes, questions, rng, batch_size, block_size, weights, scenes=None):
    """A batch from the stage-1 mixture; weights {kind: w} over vqa/depth/seg/chain. One kind per
    batch: the kinds differ in length by up to 3×, and a batch pads to its longest row, so mixing
    them within a batch would spend half the compute on padding. Over iterations the mixture holds.
    scenes (the split's scene records) say which scenes lack a true depth or seg map (real data,
    manifest.py): such a map is never a target, so those scenes sit out the kinds that draw it."""
    kinds, w = zip(*[(k, v) for k, v in weights.items() if v > 0])
    kind = rng.choice(kinds, p=np.array(w) / sum(w))
    has = lambda i, m: scenes is None or scenes[i].get(f"has_{m}", True)
    if kind == "vqa":
        pool = questions
    elif kind == "chain":
        pool = [q for q in questions if has(q["scene"], "depth") and has(q["scene"], "seg")]
    else:
        pool = [i for i in range(len(codes)) if has(i, kind)]
    if not pool:
        raise ValueError(f"no scene has the maps stage-1 {kind} examples need: set {kind}_weight=0")
    rows = []
    for _ in range(batch_size):
        pick = pool[rng.integers(len(pool))]
        if kind in ("vqa", "chain"):
            scene = pick["scene"]
            conv = conversations.vqa_conversation(pick) if kind == "vqa" else conversations.perception_chain(pick)
        else:
            scene, conv = pick, conversations.map_request(kind)
        rows.append(tok.render_conversation(conv, ev.scene_codes(codes, scene)))
    return make_batch(tok, rows, block_size)


if __name__ == "__main__":
    config = configure(globals(), section="stage1")  # config/*.py and --key=value; bad keys stop here
    t_start = time.time()
    run = trainer.setup_run(device)
    torch.manual_seed(seed)
    tok, vq, codes, questions, refs = load_stage_data(data_dir, vq_ckpt)
    n_image = codes["train"].shape[-1]
    scenes = {s: data.load_scenes(data_dir, s) for s in ("train", "val")}
    weights = {"vqa": vqa_weight, "depth": depth_weight if aux else 0, "seg": seg_weight if aux else 0,
               "chain": chain_weight if aux else 0}

    def get_batch(split, rng):
        return stage1_batch(tok, codes[split], questions[split], rng, batch_size, block_size, weights, scenes[split])

    if token_budget:
        probe = [get_batch("train", np.random.default_rng([seed, 9, k]))[0].numel() for k in range(20)]
        config["max_iters"] = max_iters = max(1, round(token_budget / (np.mean(probe) * grad_accum)))
        print(f"token budget {token_budget:,}: {max_iters} iterations")
    model, optimizer, start = trainer.init_model(config, run, tok, n_image)
    val = data.load_split(data_dir, "val")
    chance = ev.chance_scorer(questions["train"])
    eval_qs = ev.balanced_sample(questions["val"], eval_questions)
    grid_ids = list(range(min(6, eval_scenes)))

    @torch.no_grad()
    def kind_losses(model, n_batches=2):
        """Val loss of each example kind apart: the mixed val loss hides whether maps are learning."""
        out = {}
        for kind in (k for k, w in weights.items() if w > 0):
            losses = []
            for k in range(n_batches):
                x, y, m = stage1_batch(tok, codes["val"], questions["val"], np.random.default_rng([seed, 7, k]),
                                       batch_size, block_size, {kind: 1.0}, scenes["val"])
                with run.autocast():
                    losses.append(model(x.to(run.device), y.to(run.device), m.to(run.device))[1].item())
            out[f"loss_{kind}"] = float(np.mean(losses))
        return out

    def evaluate(model, it):
        model.eval()
        scores = kind_losses(model)
        scores.update(ev.vqa_accuracy(tok, eval_qs, ev.answer(model, tok, eval_qs, codes["val"], n_image, **ev.DECODE), chance))
        if aux:
            maps_metrics, maps = ev.map_quality(model, tok, vq, val, codes["val"], range(eval_scenes), n_image, **ev.DECODE)
            scores.update(maps_metrics)
            ev.map_grid(os.path.join(out_dir, f"maps_{it:05d}.png"), val, {k: v[:len(grid_ids)] for k, v in maps.items()},
                        grid_ids, vq.depth_encoding)
        model.train()
        return scores

    last = trainer.train(config, run, model, optimizer, start, get_batch, evaluate if run.master else None,
                         refs=dict(refs, stage="stage1" if aux else "base"))
    if run.ddp:
        torch.distributed.destroy_process_group()
    if run.master:
        keys = ["object_depth_absrel", "depth_absrel", "depth_delta1", "seg_miou", "seg_miou_matched", "vqa_acc", "chance_acc", "val_loss"]
        final = {k: round(last[k], 4) for k in keys if k in last}
        final.update({k: round(v, 4) for k, v in last.items() if k.startswith("loss_")})
        final.update({k: round(v, 4) for k, v in last.items() if k.startswith("acc_")})
        final["tokens"] = last["tokens"]
        final["minutes"] = round((time.time() - t_start) / 60, 2)
        print("final: " + json.dumps(final))
