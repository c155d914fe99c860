"""
Running models on the benchmarks, and the Table 1 experiment.

Every stage evaluates through these functions, so a figure means the same in every `final:` line:
  - answer: replies to questions, directly, through the PE arm's chain (depth, then seg, then the
    answer, with the model's own maps), or interleaved (the model's reasoning, tool calls and maps);
  - answer_given: interleaved replies with the true map, or its true reading, forced in;
  - map_quality: depth and segmentation maps drawn on the stage-1 instructions, decoded by the VQ
    and scored (metrics.py holds every scoring rule);
  - DECODE: how every evaluation decodes (text greedy, map codes sampled at temperature 0.5 with a fixed seed), and
    median_numbers: a number answer is the median of NUMBER_SAMPLES sampled ones.
All of them go through the one sampler (sampler.generate).

`python eval.py` runs every arm of the Table 1 analog on the test split (`evaluate_arm`): Base
(direct answers), PE (the chain), RE (text-only reasoning) and COOPER (interleaved with tools);
report.py writes what comes out as report.md.
"""
import json
import os
import time

import numpy as np
import torch

import batches
import conversations
import data
import metrics
import prepare
import report
import sampler
import tokenizer
import trainer
import vqgan
from tokenizer import MAX_TURNS

# How every evaluation decodes (stage scripts, RL's held-out pass, this report): text greedy, map
# codes sampled at temperature 0.5 with a fixed seed. A trained model's maps at 0.5 beat those at 1
# (seg matched 0.556 against 0.520, object depth AbsRel 0.091 against 0.107) and match greedy ones,
# whereas a weak model's greedy maps are bare ground and sky (sampler.generate's image_temperature;
# docs/experiments.md).
DECODE = dict(temperature=0.0, image_temperature=0.5, seed=0)
NUMBER_SAMPLES = 9  # a number answer is the median of this many sampled answers (median_numbers)
MAX_NUMBER_TOKENS = 12  # room for one sampled number answer: digits, unit, </answer>, <|eos|>


# --- running a model on the benchmarks (through the one sampler) -------------------------------
def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def one_stream(model, sampling):
    """sampling with its seed turned into one generator, so that the successive sampler calls of
    one evaluation (batches; a depth, then a seg map) draw fresh noise. Each call restarting from
    the seed gave the depth and the seg map of a row the same uniform draws."""
    if sampling.get("seed") is None or sampling.get("generator") is not None:
        return sampling
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(sampling["seed"])
    return dict({k: v for k, v in sampling.items() if k != "seed"}, generator=generator)


@torch.no_grad()
def generate_map_codes(model, tok, convs, images, n_image_tokens, batch_size=64, rgb=None, **sampling):
    """For each (conversation ending in a user turn that asks for a map, images) pair, the N codes
    of the map the model draws. The prompt ends with <|image|>: the instruction asked for a map, so
    the reply starts as one and the sampler's image mode yields exactly N codes. rgb: each pair's
    question image as pixels (sampler.generate's)."""
    sampling = one_stream(model, sampling)
    out = []
    pairs = list(zip(convs, images))
    for at in range(0, len(pairs), batch_size):
        chunk = pairs[at:at + batch_size]
        prompts = [tok.render_prompt(c, im) + [tok.image_start] for c, im in chunk]
        gen = sampler.generate(model, tok, prompts, n_image_tokens + 1, n_image_tokens, tools=False,
                               rgb=None if rgb is None else rgb[at:at + batch_size], **sampling)
        out += [np.array(gen.row(b)[:n_image_tokens]) - tok.image_offset for b in range(len(chunk))]
    return out


def map_quality(model, tok, vq, split, codes, scene_ids, n_image_tokens, **sampling):
    """Depth and segmentation maps generated from each scene's RGB codes on the stage-1
    instructions, decoded by the VQ and scored against the truth. Also returns the decoded maps."""
    ids = list(scene_ids)
    maps, sampling = {}, one_stream(model, sampling)
    for tool in ("depth", "seg"):
        gen = generate_map_codes(model, tok, [conversations.map_request(tool)[:1]] * len(ids),
                                 [batches.scene_codes(codes, i) for i in ids], n_image_tokens, rgb=split["rgb"][ids],
                                 **sampling)
        maps[tool] = vq.decode(np.stack(gen)).numpy()
    true_seg, seg = split["seg"][ids], data.rgb_to_seg(maps["seg"])
    scores = metrics.depth_metrics(data.rgb_to_depth(maps["depth"], vq.depth_encoding), split["depth"][ids], true_seg)
    palette = data.seg_palette_ids(true_seg, [split["scenes"][i] for i in ids])  # the colours the pseudo-images have
    scores["seg_miou"], scores["seg_miou_matched"] = metrics.seg_miou(seg, palette), metrics.seg_miou_matched(seg, true_seg)
    return scores, maps


def interleaved_budget(tok, n_image_tokens, text_tokens=256, tools=True):
    """New tokens an interleaved reply may take: its text plus room for MAX_TURNS-1 maps, each
    <|image|>, N codes, <|/image|> and the reflection prompt."""
    return text_tokens + ((MAX_TURNS - 1) * (n_image_tokens + 2 + len(tok.reflection_ids)) if tools else 0)


@torch.no_grad()
def median_numbers(model, tok, questions, prompts, replies, n_image_tokens, samples=NUMBER_SAMPLES, batch_size=64,
                   rgb=None, **sampling):
    """Each number question's reply with its answer replaced by the median of `samples` answers
    sampled (temperature 1) after the reply's own <answer> tag; other replies as they are.
    MRA scores a number by how near it is, and greedy decoding writes the likeliest digit first: a
    mode digit by digit, not a middle ("1" gathers every height from 100 to 199 cm and outvotes
    each of 5…9 alone). An undertrained model's greedy heights and distances scored up to 0.15 MRA
    below the median of its own samples, under the answer prior (docs/experiments.md). `sampling`
    gives the randomness (a generator or seed), as for sampler.generate; a sampler call holds at
    most batch_size rows, as `answer`'s do, since each row's KV cache spans the whole reply. rgb:
    each question's image as pixels (sampler.generate's)."""
    todo = [(i, r.index(tok.answer)) for i, (q, r) in enumerate(zip(questions, replies))
            if q["answer_type"] == "number" and tok.answer in r]
    if samples <= 1 or not todo:
        return replies
    sampling, out = one_stream(model, sampling), list(replies)
    per_call = max(1, batch_size // samples)
    for chunk in _chunks(todo, per_call):
        starts = [replies[i][:k + 1] for i, k in chunk]  # each reply through its <answer>
        rows = [prompts[i] + s for (i, _), s in zip(chunk, starts) for _ in range(samples)]  # one prefill a question
        pixels = None if rgb is None else rgb[[i for i, _ in chunk for _ in range(samples)]]
        gen = sampler.generate(model, tok, rows, MAX_NUMBER_TOKENS, n_image_tokens, tools=False, rgb=pixels,
                               **dict(sampling, temperature=1.0, top_k=None, top_p=None))
        for j, ((i, _), start) in enumerate(zip(chunk, starts)):
            q = questions[i]
            values = [metrics.parse_number(tok.answer_of(tok.parse_reply(start + gen.row(j * samples + s))[0]), q["unit"])
                      for s in range(samples)]
            values = [v for v in values if v is not None]
            if values:
                out[i] = start + tok.encode(data.number_text(float(np.median(values)), q["unit"])) + [tok.end_answer, tok.eos]
    return out


@torch.no_grad()
def answer(model, tok, questions, codes, n_image_tokens, mode="direct", batch_size=64, max_answer_tokens=None,
           tools=True, blind=False, number_samples=NUMBER_SAMPLES, rgb=None, **sampling):
    """Reply to each question; returns the reply ids of each. Modes:
    direct       RGB + question -> answer (Base, stage 1)
    chain        the PE arm the paper's way: the model generates depth, then segmentation, then answers
                 with its own maps in context
    chain_true   the same chain with the scene's true maps (their VQ codes) in place of the model's:
                 what the chain's answers lose to the maps' quality, and what to its format
    interleaved  RGB + question -> the model's own reasoning, tool calls and maps (stage 2, RL); the
                 budget is max_answer_tokens of text plus room for MAX_TURNS-1 maps. tools=False
                 masks the tool calls (the text-only RE arm)
    max_answer_tokens (of text) defaults to 24, or 256 in interleaved mode, where it covers the thinking.
    blind=True asks direct and interleaved questions without the image (the blind baseline).
    A number answer is the median of number_samples sampled ones (median_numbers; 1: as decoded).
    rgb, the pictures of the split whose codes `codes` are, lets a model that reads the question
    image's pixels read them (model.py, "Image reader")."""
    replies, sampling = [], one_stream(model, sampling)
    for chunk in _chunks(questions, batch_size):
        images = [batches.scene_codes(codes, q["scene"]) for q in chunk]
        pixels = batches.scene_pictures(rgb, chunk)
        if mode in ("chain", "chain_true"):
            convs = [conversations.perception_chain(q, answer=False) for q in chunk]
            if mode == "chain":  # its own maps: the true ones are never shown
                images = [{"rgb": im["rgb"]} for im in images]
                for tool, upto in (("depth", 1), ("seg", 3)):
                    drawn = generate_map_codes(model, tok, [c[:upto] for c in convs], images, n_image_tokens,
                                               batch_size=batch_size, rgb=pixels, **sampling)
                    images = [dict(im, **{tool: d}) for im, d in zip(images, drawn)]
        elif mode in ("direct", "interleaved"):
            convs = [conversations.vqa_conversation(q, answer=False, image=not blind) for q in chunk]
        else:
            raise ValueError(f"unknown answer mode {mode!r}")
        prompts = [tok.render_prompt(c, im) for c, im in zip(convs, images)]
        budget, use_tools = max_answer_tokens or 24, False
        if mode == "interleaved":
            budget, use_tools = interleaved_budget(tok, n_image_tokens, max_answer_tokens or 256, tools), tools
        gen = sampler.generate(model, tok, prompts, budget, n_image_tokens, tools=use_tools, rgb=pixels, **sampling)
        replies += median_numbers(model, tok, chunk, prompts, [gen.row(b) for b in range(len(chunk))], n_image_tokens,
                                  number_samples, batch_size, rgb=pixels, **sampling)
    return replies


@torch.no_grad()
def answer_given(model, tok, questions, split, codes, n_image_tokens, upto, batch_size=64, reading="values",
                 number_samples=NUMBER_SAMPLES, **sampling):
    """Interleaved replies with the truth forced into them, to see what limits an interleaved arm.
    Each question's stage-2 trace (conversations.trace_conversation, which reads the true maps) is
    forced up to a point and the model writes the rest: upto="map" forces the plan, the tool call,
    the true map (its VQ codes) and the reflection prompt, so the model reads a perfect map and
    answers; upto="reading" also forces the trace's reading of it, so the model only answers. (A
    question the trace answers without a tool: "map" forces nothing, "reading" its text reading.)
    reading is the trace style the model was fine-tuned on (conversations.trace_conversation's).
    Returns whole replies, forced part included, as `answer` does; split is load_split's dict."""
    if upto not in ("map", "reading"):
        raise ValueError(f"upto={upto!r}: expected 'map' or 'reading'")
    replies, sampling, readings = [], one_stream(model, sampling), {}
    budget = interleaved_budget(tok, n_image_tokens)
    for chunk in _chunks(questions, batch_size):
        prompts, forced = [], []
        for q in chunk:
            s = q["scene"]
            if s not in readings:
                readings[s] = conversations.map_readings(split["depth"][s], split["seg"][s])
            *user, reply = conversations.trace_conversation(q, split["scenes"][s], readings[s], reading=reading)
            parts = reply["content"]  # [think, tool, image, forced, think, answer] or [think, answer]
            cut = len(parts) - 1 if upto == "reading" else max([i + 1 for i, p in enumerate(parts) if "forced" in p], default=0)
            ids = tok.render_conversation(user + [{"role": "assistant", "content": parts[:cut]}], batches.scene_codes(codes, s))[0]
            prompts.append(ids[:-1])  # rendering closed the turn with <|eos|>: the reply goes on
            forced.append(ids[ids.index(tok.assistant) + 1:-1])  # the reply starts after <|assistant|>
        pixels = batches.scene_pictures(split["rgb"], chunk)
        gen = sampler.generate(model, tok, prompts, budget, n_image_tokens, rgb=pixels, **sampling)
        replies += median_numbers(model, tok, chunk, [p[:len(p) - len(f)] for p, f in zip(prompts, forced)],
                                  [f + gen.row(b) for b, f in enumerate(forced)], n_image_tokens, number_samples,
                                  batch_size, rgb=pixels, **sampling)
    return replies


@torch.no_grad()
def greedy_right(model, tok, rows, batch_size=64, rgb=None):
    """For each rendered row (ids, loss_mask): whether the model's argmax, teacher-forced, is the
    target at every supervised token, i.e. greedy decoding would write exactly them. rgb: each
    row's question image as pixels (model.forward's)."""
    out, device = [], next(model.parameters()).device
    for at in range(0, len(rows), batch_size):
        x, y, m = batches.make_batch(tok, rows[at:at + batch_size], model.config.block_size)
        pixels = None if rgb is None else rgb[at:at + batch_size].to(device)
        logits, _ = model(x.to(device), rgb=pixels)
        out += (~((logits.argmax(-1).cpu() != y) & m.bool()).any(dim=1)).tolist()
    return out


@torch.no_grad()
def direct_scores(model, tok, questions, codes, n_image_tokens, blind=False, batch_size=64, rgb=None):
    """Each question's score for a direct answer, cheaply: a choice, yes/no or count is right when,
    with the true answer in context, the model's argmax is the target at every answer token
    (<answer>, the text, </answer>, <|eos|>), i.e. greedy decoding would write exactly it: one
    forward pass instead of a decode (a lower bound on `answer`'s greedy score: the sampler's
    grammar masks can only remove wrong tokens). Numbers need the value the model writes, so
    they are decoded (`answer`: the median of sampled answers) and scored by MRA. blind=True asks
    without the image. rgb: as for `answer`."""
    scores = [0.0] * len(questions)
    forced = [i for i, q in enumerate(questions) if q["answer_type"] != "number"]
    rows = batches.vqa_rows(tok, [questions[i] for i in forced], codes, blind)
    pixels = batches.scene_pictures(rgb, [questions[i] for i in forced])
    for i, right in zip(forced, greedy_right(model, tok, rows, batch_size, pixels)):
        scores[i] = float(right)
    numbers = [i for i, q in enumerate(questions) if q["answer_type"] == "number"]
    asked = [questions[i] for i in numbers]
    replies = answer(model, tok, asked, codes, n_image_tokens, batch_size=batch_size, blind=blind, temperature=0.0, rgb=rgb)
    for i, s in zip(numbers, metrics.question_scores(tok, asked, replies)):
        scores[i] = s["score"]
    return scores


def balanced_sample(questions, n, seed=0):
    """Up to n questions, the same number from each category (at least one each for n > 0), in a
    fixed order; none for n <= 0."""
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    cats = sorted({q["category"] for q in questions})
    per = max(1, n // len(cats))
    out = []
    for c in cats:
        qs = [q for q in questions if q["category"] == c]
        out += [qs[i] for i in sorted(rng.permutation(len(qs))[:per])]
    return out


def map_grid(path, split, maps, scene_ids, vq_encoding, scale=3):
    """PNG: one row per scene: RGB | generated depth | true depth | generated seg | true seg."""
    from PIL import Image
    rows, ids = [], list(scene_ids)
    true_seg = data.seg_to_rgb(data.seg_palette_ids(split["seg"][ids], [split["scenes"][i] for i in ids]))
    for k, i in enumerate(ids):
        cells = [split["rgb"][i], maps["depth"][k], data.depth_to_rgb(split["depth"][i], vq_encoding),
                 maps["seg"][k], true_seg[k]]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid).save(path)


# --- the Table 1 experiment -----------------------------------------------------------------------
# arm -> (checkpoint under a run root, how it answers, tools in reasoning, paper's counterpart)
ARMS = {
    "Base": ("base", "direct", False, "BAGEL"),
    "PE": ("stage1", "chain", False, "BAGEL-PE"),
    "RE": ("rl_text", "interleaved", False, "BAGEL-RE"),
    "COOPER": ("rl", "interleaved", True, "COOPER"),
}


def evaluate_arm(arm, roots, data_dir, vq_ckpt, n_questions, n_map_scenes, batch_size, report_dir):
    """One arm of the Table 1 analog, every seed's checkpoint of it: per-question scores, tool use
    (interleaved arms), map quality (PE, COOPER), the PE map grid and the COOPER example trace
    (written to report_dir). eval.py runs arms side by side in worker processes, one thread each:
    decoding is many small ops, for which a second thread buys little and a second process doubles
    the work done."""
    torch.set_num_threads(1)
    t0 = time.time()
    stage, mode, use_tools, _ = ARMS[arm]
    vq = vqgan.load_vqgan(vq_ckpt)
    tok = tokenizer.Tokenizer.load(tokenizer.tokenizer_path(data_dir), vq.cfg.codebook_size)
    test = data.load_split(data_dir, "test")
    codes = vqgan.load_codes(data_dir, "test").astype(np.int64)
    n_image = codes.shape[-1]
    qs = balanced_sample(test["questions"], n_questions)
    out = {"per_seed": [], "per_seed_direct": [], "per_seed_true_maps": [], "given": {"map": [], "reading": []},
           "tools": [], "maps": [], "example": None}
    for root in roots:
        path = os.path.join(root, stage, "ckpt.pt")
        if not os.path.exists(path):
            print(f"{arm}: no checkpoint at {path}, skipped", flush=True)
            continue
        model, _ = trainer.load_model(path)
        print(f"{arm}: {path}, answering {len(qs)} test questions ({mode})", flush=True)
        replies = answer(model, tok, qs, codes, n_image, mode=mode, tools=use_tools, batch_size=batch_size, rgb=test["rgb"],
                         **DECODE)
        out["per_seed"].append(metrics.question_scores(tok, qs, replies))
        if arm == "PE":  # the PE arm three ways: direct answers, and the paper's chain with the true maps too
            for key, how in (("per_seed_direct", "direct"), ("per_seed_true_maps", "chain_true")):
                out[key].append(metrics.question_scores(tok, qs, answer(model, tok, qs, codes, n_image, mode=how,
                                                                        batch_size=batch_size, rgb=test["rgb"], **DECODE)))
        if arm == "COOPER":  # what limits it: the same questions with the true map, then its true reading, forced in
            reading = report.run_config(root, "stage2").get("reading", "values")  # the traces it was fine-tuned on
            for upto, per_seed in out["given"].items():
                per_seed.append(metrics.question_scores(tok, qs, answer_given(model, tok, qs, test, codes, n_image, upto,
                                                                      batch_size=batch_size, reading=reading, **DECODE)))
        if mode == "interleaved":
            out["tools"].append(metrics.tool_use(tok, qs, replies))
            if use_tools and out["example"] is None:
                k = next((i for i, r in enumerate(replies) if any("tool" in p for p in tok.parse_reply(r)[0])), 0)
                out["example"] = report.trace_markdown(tok, vq, qs[k], replies[k], report_dir, "trace")
        if arm in ("PE", "COOPER"):
            m, maps = map_quality(model, tok, vq, test, codes, range(n_map_scenes), n_image, **DECODE,
                                  batch_size=batch_size)
            out["maps"].append(m)
            if arm == "PE" and root == roots[0]:
                shown = list(range(min(6, n_map_scenes)))
                map_grid(os.path.join(report_dir, "maps_pe.png"), test, {k: v[:len(shown)] for k, v in maps.items()},
                         shown, vq.depth_encoding)
    print(f"{arm}: evaluated in {time.time() - t0:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    import concurrent.futures
    import functools
    import multiprocessing

    from configurator import configure

    # -----------------------------------------------------------------------------
    data_dir = "data/tiny"
    vq_ckpt = "out/vqgan/ckpt.pt"
    runs = "out"  # run roots, comma-separated (one per seed): each holds base/, stage1/, rl_text/, rl/
    report_dir = "report"
    n_questions = 280  # test questions, balanced over categories
    n_map_scenes = 64  # test scenes whose generated maps are scored
    batch_size = 64
    workers = 2  # processes evaluating arms side by side (one thread each); 1: all in this process
    configure(globals(), section="eval")
    # -----------------------------------------------------------------------------
    t0 = time.time()
    prepare.prepare(data_dir, vq_ckpt)  # finds everything in place after training; builds what is missing
    os.makedirs(report_dir, exist_ok=True)
    roots = [r for r in runs.split(",") if r]
    setup = dict(roots=roots, data_dir=data_dir, vq_ckpt=vq_ckpt, n_questions=n_questions,
                 n_map_scenes=n_map_scenes, batch_size=batch_size, report_dir=report_dir)
    order = ["COOPER", "PE", "RE", "Base"]  # the longest first, so the two workers finish together
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # a forked child may hang in the parent's OpenMP pool
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            done = dict(zip(order, pool.map(functools.partial(evaluate_arm, **setup), order)))
    else:
        done = {arm: evaluate_arm(arm, **setup) for arm in order}
    qs = balanced_sample(data.load_questions(data_dir, "test"), n_questions)  # the workers' questions (no images needed here)
    table, rows = report.write(report_dir, {arm: done[arm] for arm in ARMS}, data_dir, len(qs), roots,
                               f"{(time.time() - t0) / 60:.1f} min with `python eval.py --runs={runs}`")
    final = {arm: {"spatial_avg": round(t["spatial_avg"][0], 4), "distance_mra": round(t["acc_distance"][0], 4),
                   "size_mra": round(t["acc_size"][0], 4), "general_acc": round(t["acc_general"][0], 4),
                   "seeds": len(roots)} for arm, t in table.items() if "acc_distance" in t and "acc_general" in t}
    print("\n".join(rows + [""] + report.claims(table)))
    print(f"wrote {report_dir}/report.md")
    print("final: " + json.dumps(final))
