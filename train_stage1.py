"""
Stage 1 (COOPER §3.1): spatial VQA plus auxiliary modality generation.

The model learns, in one vocabulary and with one next-token loss, to
  (a) answer spatial questions directly:            RGB, question -> <answer>…</answer>
  (b) draw a depth map on the paper's instruction:   RGB, <depth-estimation>…</depth-estimation> -> map
  (c) draw a segmentation map likewise:              RGB, <segmentation>…</segmentation> -> map
  (d) answer with its maps in context, the way the PE arm is judged: RGB -> depth -> seg -> question -> answer
Loss falls only on what the assistant says. `--aux=False` trains the Base arm on the same VQA
examples (a) alone, without the seg head (it guides the seg maps drawn, and Base draws none);
`--token_budget=N` sizes a run by tokens instead of iterations (a Base run with the tokens of Base
and stage 1 together tells whether a gain is more than extra compute).

The paper starts stage 1 from a pretrained model that already answers questions; here that model
is the Base arm, so the pipeline (runs/tiny_cpu.sh) trains Base first and starts stage 1 from it
with --init_from. From scratch, the tiny preset's stage 1 spends its steps learning to draw as well
as to answer, and its answers rarely left their prior; from Base it keeps Base's comparisons
while it learns the maps (docs/experiments.md).

    python train_stage1.py --aux=False --out_dir=out/base   # the Base arm; prepare.py builds data, BPE, VQ and codes if missing
    python train_stage1.py --init_from=out/base/ckpt.pt     # stage 1 from Base (from scratch without --init_from)
    torchrun --standalone --nproc_per_node=8 train_stage1.py config/full_gpu.py
"""
import json
import os
import time

import numpy as np
import torch

import batches
import data
import eval as ev
import metrics
import prepare
import trainer
from configurator import configure

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/stage1"
init_from = "scratch"  # scratch | resume (out_dir/ckpt.pt) | path to a checkpoint to start from (its heads come with it, and one turned on below that it lacks starts from scratch; the loss weights below are this run's)
data_dir = "data/tiny"
vq_ckpt = "out/vqgan/ckpt.pt"
seed = 1337
device = "auto"  # auto: cuda if available, else cpu
compile = False  # torch.compile the model (CUDA)
# the mixture: aux=False trains the Base arm (direct VQA only); the weights are the relative
# frequencies of the example kinds (a)-(d) above
aux = True
vqa_weight = 1.0
depth_weight = 0.5
seg_weight = 0.5
chain_weight = 0.5
questions_per_image = 7  # > 1: a VQA example asks up to this many of its scene's questions after one image
practice = "scene"  # where the packed questions come from: file, scene (drawn fresh) or drills (+ grounding drills; batches.py)
practice_weights = {}  # {category: w}: draw the fresh questions' categories in proportion to w (1 if not named; batches.py)
even_counts = False  # True: draw the fresh counting questions' counts evenly, 3 and more as one, zeros as before (data.pick_question)
branched = False  # True: packed questions each see the image and only their own turn, so none reads another's answer
# True: depth, seg and chain examples ask up to questions_per_image of their scene's questions after their maps too
# (the referring loss with them); else answering after the maps is untaught, and the chain (the PE arm) scored 0.14
# under direct answers, with true maps as with its own (docs/experiments.md)
map_questions = True
map_noise = 0.0  # > 0: this share of the drawn maps' input codes replaced by random ones in training (batches.noisy_maps)
# model
n_layer = 4
n_head = 4
n_kv_head = 1  # key/value heads (0: n_head): one for the four query heads decodes faster and learned as well (docs/experiments.md)
n_embd = 128
block_size = 640  # the longest tiny-preset example (RGB, depth, seg, five offered options, answer) is ~520 tokens
dropout = 0.0
attn_impl = "auto"  # auto: triton on CUDA, sdpa otherwise
grid_rope = True  # image codes' rotations follow their grid place (model.py)
grid_prior = 6.0  # map codes' attention starts on the aligned place (model.py)
code_patches = False  # True: each code's mean pixel patch joins its embedding (model.py, GPTConfig.code_patch_dim)
object_head = True  # True: a head names the object at each RGB place, its loss added (losses.py, "Place heads")
object_head_weight = 1.0  # the object head's loss is scaled by this
depth_head = True  # True: a head gives each RGB place's depth, binned, its loss added (losses.py, "Place heads"): size and distance + 0.04–0.07
depth_head_weight = 0.25  # the depth head's loss is scaled by this: a quarter keeps most of its size gain at a third of its cost (docs/experiments.md)
# True: a head names each RGB place's code of the seg map, its loss added (losses.py, "Place heads"); at a quarter of
# its loss, guiding the seg maps drawn (seg_guidance), seg matched + 0.043 in the tiny preset (0.5632 against 0.5198),
# vqa_acc - 0.010; at 0.75 + 0.055 but Base's answers fell 0.10. The Base arm trains without it (below): stage 1 adds
# it from scratch, seg matched 0.5425 against 0.5571 with Base's, Base's vqa_acc 0.705 against 0.661 (docs/experiments.md)
seg_head = True
seg_head_weight = 0.25  # the seg head's loss is scaled by this
anchor_head = False  # True: a head names each object's class at the one place it covers most, its loss added (losses.py, "Place heads")
anchor_head_weight = 1.0  # the anchor head's loss is scaled by this
seg_head_hidden = 0  # > 0: the seg head is an MLP this wide (losses.py, "Place heads")
seg_guidance = 4.0  # > 0 (with seg_head): seg maps are drawn with the seg head's log-probabilities added, times this (sampler.generate)
number_weight = 1.0  # > 0: a head regresses each number answer's log value, its loss scaled so (losses.py, "Numbers"): distance apart off its prior, distance + 0.05 (docs/experiments.md)
refer_heads = 2  # > 0: that many last-layer heads are taught to look at what each question names (losses.py, "Referring")
pointer = False  # True: what each referring head brings back must say where it looked (losses.py, "Referring")
refer_layer = -1  # the block whose heads the referring loss teaches (-1: the last)
choose = False  # True: the last head of the last layer is taught to copy a named answer's words from its option (losses.py, "Choosing")
refer_options = False  # True: at each multiple-choice option's name, the first referring head is taught to look at its object
image_reader = True  # True: the RGB is also read as pixels through a conv stem, VQ-decoded unless reader_pixels (model.py, "Image reader")
reader_pixels = True  # True: the reader reads the question image's own pixels, not its decoded codes (model.py, "Image reader")
# optimisation: an iteration is grad_accum micro-batches of batch_size sequences, split across ranks
max_iters = 1000
base_iters = 0  # > 0: the Base arm (aux=False) trains this many iterations instead of max_iters
token_budget = 0  # > 0: set max_iters so the run trains on about this many tokens
batch_size = 4  # small batches, many steps: at a fixed token budget batch 4 learns the answers far sooner than 16 (docs/experiments.md)
grad_accum = 1
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
warmdown = 0.4  # > 0: the peak lr held, then a straight fall to min_lr over this last share of the run; 0: cosine (every category + 0.01–0.045, docs/experiments.md)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
optimizer = "muon"  # muon: Muon for the blocks' matrices at muon_lr (optim.Muon), AdamW for the rest; or adamw
muon_lr = 0.05
# logging and evaluation
log_interval = 10
eval_interval = 250
eval_iters = 10  # val batches for the val loss
eval_scenes = 32  # val scenes whose generated maps are scored at each evaluation
eval_questions = 140  # val questions (balanced over categories) answered at each evaluation (eval.DECODE)
peak_tflops = 0.0  # what MFU is measured against; 0: measure (CPU) or look up (GPU)
# -----------------------------------------------------------------------------


def run_iters(aux, max_iters, base_iters):
    """This run's iterations: the Base arm (aux=False) takes base_iters when that is set."""
    return base_iters if not aux and base_iters > 0 else max_iters


if __name__ == "__main__":
    config = configure(globals(), section="stage1")  # config/*.py and --key=value; bad keys stop here
    config["max_iters"] = max_iters = run_iters(aux, max_iters, base_iters)
    if not aux and seg_head:  # the seg head guides the seg maps drawn, which the Base arm never draws, and cost its answers
        print("the Base arm (aux=False) trains no seg head: it draws no seg maps (stage 1 adds the head from scratch)")
        config["seg_head"], config["seg_guidance"] = seg_head, seg_guidance = False, 0.0
    t_start = time.time()
    run = trainer.setup_run(device)
    torch.manual_seed(seed)
    tok, vq, codes, questions, refs = prepare.stage_data(data_dir, vq_ckpt)
    n_image = codes["train"].shape[-1]
    weights = {"vqa": vqa_weight, "depth": depth_weight if aux else 0, "seg": seg_weight if aux else 0,
               "chain": chain_weight if aux else 0}

    reads_pixels = trainer.reads_pixels(config)
    splits = {s: data.load_split(data_dir, s)  # each split read once; train only for the place labels or pixels
              for s in ("train", "val") if s == "val" or object_head or depth_head or seg_head or anchor_head or refer_heads or reads_pixels}
    scenes = {s: splits[s]["scenes"] if s in splits else data.load_scenes(data_dir, s) for s in ("train", "val")}
    places, coverage = batches.place_targets(splits, n_image, object_head, depth_head, refer_heads, seg_head, codes, anchor_head)

    rgb = {s: sp["rgb"] for s, sp in splits.items()} if reads_pixels else None
    val_rgb = None if rgb is None else rgb["val"]
    get_batch = batches.stage1_batches(tok, codes, questions, scenes, config, weights, places, coverage, rgb=rgb)

    if token_budget:
        probe = [get_batch("train", np.random.default_rng([seed, 9, k]))[0].numel() for k in range(20)]
        config["max_iters"] = max_iters = max(1, round(token_budget / (np.mean(probe) * grad_accum)))
        print(f"token budget {token_budget:,}: {max_iters} iterations")
    patches = prepare.code_patches(data_dir, vq, codes["train"]) if code_patches and init_from == "scratch" else None
    model, optimizer, start = trainer.init_model(config, run, tok, n_image, patches, vq)
    val = splits["val"]
    chance = metrics.chance_scorer(questions["train"])
    eval_qs = ev.balanced_sample(questions["val"], eval_questions)
    grid_ids = list(range(min(6, eval_scenes)))

    @torch.no_grad()
    def kind_losses(model, n_batches=2):
        """Val loss of each example kind apart: the mixed val loss hides whether maps are learning."""
        out = {}
        for kind in (k for k, w in weights.items() if w > 0):
            losses = []
            for k in range(n_batches):
                batch = batches.stage1_batch(tok, codes["val"], questions["val"], np.random.default_rng([seed, 7, k]),
                                             batch_size, block_size, {kind: 1.0}, scenes["val"], rgb=val_rgb)
                with run.autocast():
                    losses.append(trainer.lm_loss(model, trainer.to_device(batch, run.device))[0].item())
            out[f"loss_{kind}"] = float(np.mean(losses))
        return out

    def evaluate(model, it):
        model.eval()
        scores = kind_losses(model)
        scores.update(metrics.vqa_accuracy(tok, eval_qs, ev.answer(model, tok, eval_qs, codes["val"], n_image,
                                                                        rgb=val["rgb"], **ev.DECODE), chance))
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
