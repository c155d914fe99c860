"""
Stage 2a (COOPER §3.2): adaptive interleaved reasoning, taught by supervised fine-tuning.

After stage 1 the model answers directly and draws depth or segmentation maps on request. Here it
learns *when* a map helps and what to do with it. Each training example is a trace built from the
scene graph (conversations.build_traces): the model plans in <think>, calls the tool the question
needs (depth for distance, size, depth order; segmentation for counting and left/right; none for
colour and shape), draws the map into its own context, reads values off it in a second <think> and
answers:

    RGB, question -> <think>plan</think><depth-estimation>…</depth-estimation><|image|> map <|/image|>
                     REFLECTION_PROMPT <think>the red cube is at 4.2 m; …</think><answer>…</answer>

With reading="brief" the second <think> is one fixed sentence instead of a reading (the tiny
presets): a model this small does not learn to write readings that name the right objects, and an
answer that follows a wrong reading undoes what stage 1 learned; the brief trace keeps more of it
(docs/experiments.md, "Brief traces"). With place_losses=True stage 1's object-head and referring
losses stay on during SFT, the referring heads looking from each trace's <answer>: the lookup that
answers the question is trained where the trace answers it.

The set is balanced over categories (conversations.balance_traces says how tool / no tool comes
out). The loss is the mean over the assistant's own text plus image_loss × the mean over the codes
of the maps it draws, each normalised on its own (`trace_loss`); the tokens the sampler forces
(<|image|> after a tool call, <|/image|>, the reflection prompt) carry none. Both halves matter:
a trace has ~256 map codes to ~60 text tokens, so one mean over both let the maps drown the text
(100 tiny steps left no reply well formed), and no loss on codes let stage 2 forget how to draw
(the code rows of the head still move under AdamW: at map places the tiny model's probability on
codes fell from 98% to 0.25%, and its depth AbsRel went 0.52 -> 0.86). Training is the one loop in
trainer.py; batches come from batches.stage2_batch.

The traces hold the true maps, but at test time the model reads its own. The weaker its maps, the
further that context is from training: with the tiny preset's stage 1 (maps near constant), the
replies it finishes after its own map are well formed ~85% of the time, after the true map 100%.

Two arms of the experiment (eval.py):
  tools=all    COOPER: starts from stage 1 (out/stage1/ckpt.pt), writes out/stage2
  tools=none   RE: text-only chain of thought on the same questions, quoting only what the RGB
               image shows; starts from the Base arm (out/base/ckpt.pt), writes out/stage2_text
With --tools=none, init_from and out_dir follow the arm unless they are set. A missing init
checkpoint stops the run with the command that trains it.

At the end the model answers balanced val questions (text greedy, maps sampled) through the real
sampler (tool loop on for COOPER, off for RE): format validity (tokenizer.parse_reply, the RL
format reward's parser), tool use per category, and accuracy per category beside the init model's
direct answers.

    python train_stage2.py                    # COOPER arm, tiny preset defaults
    python train_stage2.py --tools=none       # RE arm
    python train_stage2.py config/tiny_cpu.py --image_loss=0.0   # text only
"""
import json
import os
import time

import numpy as np
import torch

import batches
import conversations
import data
import eval as ev
import metrics
import prepare
import trainer
from configurator import configure

# -----------------------------------------------------------------------------
# I/O: fine-tuning starts from a previous stage's weights (the model's shape comes from them)
out_dir = "out/stage2"
init_from = "out/stage1/ckpt.pt"  # or resume (out_dir/ckpt.pt)
data_dir = "data/tiny"
vq_ckpt = "out/vqgan/ckpt.pt"
seed = 1337
device = "auto"  # auto: cuda if available, else cpu
compile = False  # torch.compile the model (CUDA)
attn_impl = "auto"  # auto: triton on CUDA, sdpa otherwise
# the arm and its loss
tools = "all"  # all: the COOPER arm (interleaved tool calls); none: the RE arm (text-only reasoning)
reading = "values"  # values: the final <think> reads the question's objects off the map; brief: one fixed sentence (conversations.py)
place_losses = False  # True: the init model's place, referring and number losses (stage 1's) on the traces too
image_loss = 0.5  # weight of the drawn maps' mean code loss beside the text's mean loss (0: text only)
# optimisation: an iteration is grad_accum micro-batches of batch_size traces, split across ranks
max_iters = 200
batch_size = 8
grad_accum = 1
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
optimizer = "muon"  # muon: Muon for the blocks' matrices at muon_lr (optim.Muon), AdamW for the rest; or adamw
muon_lr = 0.05  # a 4×128 model under AdamW still broke the reply format a fifth of the time after 250 iterations
# logging and evaluation
log_interval = 10
eval_interval = 200
eval_iters = 10  # val batches for the val loss
eval_questions = 210  # val questions (balanced over categories) answered at each evaluation (eval.DECODE)
peak_tflops = 0.0  # what MFU is measured against; 0: measure (CPU) or look up (GPU)
# -----------------------------------------------------------------------------
# arm -> (init checkpoint, out_dir, the command that builds the init): the defaults of each arm
ARMS = {"all": ("out/stage1/ckpt.pt", "out/stage2", "python train_stage1.py"),
        "none": ("out/base/ckpt.pt", "out/stage2_text", "python train_stage1.py --aux=False --out_dir=out/base")}


def arm_paths(tools, init_from, out_dir):
    """(init_from, out_dir) for the arm: values left at the COOPER arm's defaults follow `tools`."""
    if tools not in ARMS:
        raise SystemExit(f"config error: tools must be one of {', '.join(ARMS)}, got {tools!r}")
    default_init, default_out, _ = ARMS["all"]
    arm_init, arm_out, _ = ARMS[tools]
    return (arm_init if init_from == default_init else init_from), (arm_out if out_dir == default_out else out_dir)


def require_init(path, tools):
    """Stop with the command to run if the init checkpoint is missing (stage 2 builds no stage 1)."""
    if path not in ("scratch", "resume") and not os.path.exists(path):
        raise SystemExit(f"init checkpoint {path} is missing: train it first ({ARMS[tools][2]}, "
                         "or bash runs/tiny_cpu.sh for the whole pipeline)")


def place_settings(init_from, out_dir):
    """The place and referring losses that place_losses=True keeps on: {"object_head", "depth_head",
    "seg_head", "anchor_head", "refer_heads"} as the stage-1 run that trained the init model set them. A stage-2 run keeps them
    in its own config, so a resume (init_from="resume", the checkpoint in out_dir) reads them back."""
    path = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else init_from
    saved = trainer.load_checkpoint(path)["config"]
    return saved.get("place_settings") or {"object_head": saved.get("object_head", False),
                                           "depth_head": saved.get("depth_head", False),
                                           "seg_head": saved.get("seg_head", False),
                                           "anchor_head": saved.get("anchor_head", False),
                                           "refer_heads": saved.get("refer_heads", 0)}


def trace_loss(model, batch, image_offset, image_weight):
    """(mean loss on text + image_weight × mean loss on drawn map codes, their values): the loop's
    loss_fn. Targets from image_offset up are codes; the batch's mask already excludes forced tokens.
    A batch with stage 1's place and referring targets (place_losses=True) adds those losses too."""
    x, y, m, *extra = batch  # extra: stage 1's place and referring targets (place_losses=True), the pictures
    kw = extra[0] if extra else {}
    stage1_targets = any(k != "rgb" for k in kw)
    logits, full = model(x, y if stage1_targets else None, loss_mask=m, **kw)  # logits at the supervised positions
    at = m > 0
    nll = torch.nn.functional.cross_entropy(logits.float(), y[at], reduction="none")
    w, is_code = m[at].to(nll.dtype), (y[at] >= image_offset).to(nll.dtype)
    parts = [(nll * w * k).sum() / (w * k).sum().clamp(min=1) for k in (1 - is_code, is_code)]
    place = full - (nll * w).sum() / w.sum().clamp(min=1) if stage1_targets else 0  # the model's loss less its token part
    return parts[0] + image_weight * parts[1] + place, {"loss_text": parts[0].item(), "loss_codes": parts[1].item()}


def print_table(scores, init_scores, categories, init_name):
    print(f"{'category':<18}{init_name + ' direct':>14}{'stage 2':>9}{'depth':>7}{'seg':>6}{'none':>6}{'pattern':>9}")
    for c in categories:
        use = [scores.get(f"use_{t}_{c}", float("nan")) for t in ("depth", "seg", "none")]
        print(f"{c:<18}{init_scores[f'acc_{c}']:>14.3f}{scores[f'acc_{c}']:>9.3f}"
              + "".join(f"{u:>{w}.2f}" for u, w in zip(use, (7, 6, 6))) + f"{scores.get(f'pattern_{c}', float('nan')):>9.2f}")
    print(f"{'mean':<18}{init_scores['vqa_acc']:>14.3f}{scores['vqa_acc']:>9.3f}")


if __name__ == "__main__":
    config = configure(globals(), section="stage2")  # config/*.py and --key=value; bad keys stop here
    t_start = time.time()
    init_from, out_dir = arm_paths(tools, init_from, out_dir)
    if reading not in conversations.READINGS:
        raise SystemExit(f"config error: reading must be one of {', '.join(conversations.READINGS)}, got {reading!r}")
    config.update(init_from=init_from, out_dir=out_dir)
    print(f"stage 2, {'COOPER' if tools == 'all' else 'RE'} arm (tools={tools}): {init_from} -> {out_dir}")
    require_init(init_from, tools)
    run = trainer.setup_run(device)
    torch.manual_seed(seed)
    tok, vq, codes, questions, refs = prepare.stage_data(data_dir, vq_ckpt)
    n_image = codes["train"].shape[-1]
    splits = {s: data.load_split(data_dir, s) for s in ("train", "val")}  # read once: traces, place targets
    traces = {}
    for split in ("train", "val"):
        traces[split], stats = batches.load_traces(splits[split], tools, seed, reading)
        if run.master:
            print(f"{split} traces: " + json.dumps(stats))
    model, optimizer, start = trainer.init_model(config, run, tok, n_image)
    block = model.config.block_size  # the checkpoint's, not this script's default
    if run.master:
        lengths = [len(tok.render_conversation(t["conversation"], batches.scene_codes(codes["train"], t["scene"]))[0])
                   for t in traces["train"][:2000]]
        print(f"trace length: mean {np.mean(lengths):.0f}, max {max(lengths)} tokens (block_size {block})")

    places, coverage, heads = {}, {}, 0
    numbers = place_losses and model.config.number_weight > 0  # stage 1's number head, kept on as its other losses are
    if place_losses:  # kept in the run's config, where a resume finds them
        config["place_settings"] = kept = place_settings(init_from, out_dir)
        heads = kept["refer_heads"]
        places, coverage = batches.place_targets(splits, n_image, kept["object_head"], kept["depth_head"], heads,
                                                 kept.get("seg_head", False), codes, kept.get("anchor_head", False))

    rgb = {s: sp["rgb"] for s, sp in splits.items()} if model.config.reader_pixels else {}

    def get_batch(split, rng):
        return batches.stage2_batch(tok, codes[split], traces[split], rng, batch_size, block, places.get(split),
                                    coverage.get(split), heads, rgb.get(split), numbers)

    eval_qs = ev.balanced_sample(questions["val"], eval_questions)
    categories = sorted({q["category"] for q in eval_qs})
    init_scores = {}
    if run.master:  # the init model's direct answers on the same questions: what stage 2 must beat
        model.eval()
        init_scores = metrics.vqa_accuracy(tok, eval_qs, ev.answer(model, tok, eval_qs, codes["val"], n_image,
                                                                rgb=splits["val"]["rgb"], **ev.DECODE))
        model.train()
        print(f"init ({init_from}) direct answers: acc {init_scores['vqa_acc']:.3f}")

    def evaluate(model, it):
        model.eval()
        replies = ev.answer(model, tok, eval_qs, codes["val"], n_image, mode="interleaved", tools=tools == "all",
                            rgb=splits["val"]["rgb"], **ev.DECODE)
        scores = {**metrics.vqa_accuracy(tok, eval_qs, replies), **metrics.tool_use(tok, eval_qs, replies)}
        with open(os.path.join(out_dir, f"replies_{it:05d}.txt"), "w") as f:  # to read what it does
            for q, r in list(zip(eval_qs, replies))[::len(eval_qs) // 28 or 1]:
                f.write(f"[{q['category']}] {q['question']} (answer {q['answer']})\n  {tok.decode(r)}\n")
        model.train()
        return scores

    last = trainer.train(config, run, model, optimizer, start, get_batch, evaluate if run.master else None,
                         refs=dict(refs, stage="stage2" if tools == "all" else "stage2_text"),
                         loss_fn=lambda model, batch: trace_loss(model, batch, tok.image_offset, image_loss))
    if run.ddp:
        torch.distributed.destroy_process_group()
    if run.master:
        print_table(last, init_scores, categories, "base" if tools == "none" else "stage 1")
        final = {k: round(last[k], 4) for k in ("format_valid", "tool_pattern", "val_loss")}
        final["acc"] = round(last["vqa_acc"], 4)
        final["init_acc"] = round(init_scores["vqa_acc"], 4)
        final.update({f"acc_{c}": round(last[f"acc_{c}"], 4) for c in categories})
        final.update({f"init_acc_{c}": round(init_scores[f"acc_{c}"], 4) for c in categories})
        final.update(tools=tools, traces=len(traces["train"]), tokens=last["tokens"],
                     minutes=round((time.time() - t_start) / 60, 2))
        print("final: " + json.dumps(final))
