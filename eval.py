"""
Evaluation: how answers and generated maps are scored (DESIGN §6). Every stage's final figures,
the RL accuracy reward and the report use these functions, so a number means the same everywhere.

Answers (the benchmarks' rules, rule-based, no judge model):
  - numbers (distance, size): the value is parsed with its unit and converted to the question's
    unit; a missing unit means the question's; a unit that is not a length scores 0. Scored by
    MRA, the mean over θ ∈ {.50, .55, …, .95} of [|pred − true| / true < 1 − θ] (VSI-Bench), and
    δ<2, whether pred is within a factor 2 of true (Q-Spatial);
  - choices, yes/no and counts: exact match after lower-casing and trimming punctuation.
Maps (depth decoded to metres, segmentation to instance ids, against the renderer's truth):
  - depth AbsRel and δ1 (< 1.25) over object pixels; per-object AbsRel of the median depth inside
    each object's true mask (what a reasoning trace reads off a map);
  - segmentation object mIoU: IoU of each true object's mask with the pixels predicted as that id,
    averaged over (image, object); ids absent from the truth are not scored.
Tool use (interleaved replies): format validity and which tool each category calls (`tool_use`).

`python eval.py` runs every arm of the Table 1 analog on the test split (`evaluate_arm`); report.py
writes what comes out as report.md.
"""
import collections
import json
import os
import re
import time

import numpy as np
import torch

import conversations
import data
import report
import sampler
from tokenizer import MAX_TURNS

# How every evaluation decodes (stage scripts, RL's held-out pass, this report): text greedy, map
# codes sampled at temperature 1 with a fixed seed. Greedy maps are bare ground and sky: see
# sampler.generate's image_temperature.
DECODE = dict(temperature=0.0, image_temperature=1.0, seed=0)
THETAS = np.arange(0.50, 0.951, 0.05)
UNITS = {"m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0,
         "cm": 0.01, "centimeter": 0.01, "centimeters": 0.01, "centimetre": 0.01, "centimetres": 0.01,
         "mm": 0.001, "millimeters": 0.001, "km": 1000.0}
NUMBER = re.compile(r"(-?\d+(?:\.\d*)?|-?\.\d+)\s*([a-zA-Z]+)?")


# --- answers -------------------------------------------------------------------------------------
def parse_number(text, unit):
    """'2.3 m', '230cm', '2.3' -> the value in `unit` ('m' or 'cm'), or None if there is no number
    or its unit is not a length."""
    if text is None:
        return None
    m = NUMBER.search(text)
    if not m:
        return None
    value, u = float(m.group(1)), (m.group(2) or unit).lower()
    if u not in UNITS:
        return None
    return value * UNITS[u] / UNITS[unit]


def mra(pred, true):
    """Mean relative accuracy over the thresholds θ = .50 … .95."""
    if pred is None:
        return 0.0
    rel = abs(pred - true) / abs(true)
    return float(np.mean(rel < 1 - THETAS))


def within_factor_2(pred, true):
    return float(pred is not None and pred > 0 and max(pred / true, true / pred) < 2)


def normalise(text):
    return re.sub(r"[\s.!,;:]+$", "", text.strip().lower()) if text is not None else None


def score_answer(q, text):
    """Accuracy of answer text for question q (a dataset record): MRA for numbers, 0/1 otherwise."""
    if q["answer_type"] == "number":
        return mra(parse_number(text, q["unit"]), q["value"])
    return float(normalise(text) == normalise(q["answer"]))


def chance_scorer(train_questions):
    """q -> what answering without looking scores: the train majority answer of q's template for
    yes/no and counts, the train median for numbers, uniform guessing among choices."""
    groups = collections.defaultdict(list)
    for t in train_questions:
        groups[(t["kind"], _template(t))].append(t)
    guess = {}
    for key, qs in groups.items():
        if qs[0]["answer_type"] == "number":
            guess[key] = float(np.median([t["value"] for t in qs]))
        else:
            answers = [normalise(t["answer"]) for t in qs]
            guess[key] = max(sorted(set(answers)), key=answers.count)

    def score(q):
        if q["answer_type"] == "choice":
            return 1.0 / len(q["choices"])
        g = guess.get((q["kind"], _template(q)))
        if g is None:
            return 0.0
        return mra(g, q["value"]) if q["answer_type"] == "number" else float(g == normalise(q["answer"]))
    return score


def _template(q):
    """A question's wording with object names removed ("How tall is the …, in centimeters?")."""
    return re.sub(r"the (\w+) (cube|sphere|cylinder)|\b(cube|sphere|cylinder)s?\b|\b\w+ objects\b", "_", q["question"])


# --- maps ----------------------------------------------------------------------------------------
def depth_metrics(pred, true, seg):
    """pred, true: metres (N, H, W); seg: true instance ids (N, H, W). Object pixels with a true
    reading only (real depth files have holes, loaded as NaN)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    obj = (seg >= 2) & np.isfinite(true)
    rel = np.abs(pred[obj] - true[obj]) / true[obj]
    ratio = np.maximum(pred[obj] / true[obj], true[obj] / pred[obj])
    per_object = [abs(np.median(pred[i][m]) / np.median(true[i][m]) - 1)
                  for i in range(len(seg)) for k in np.unique(seg[i][obj[i]]) for m in [obj[i] & (seg[i] == k)]]
    return {"depth_absrel": float(rel.mean()), "depth_absrel_median": float(np.median(rel)),
            "depth_delta1": float((ratio < 1.25).mean()), "object_depth_absrel": float(np.mean(per_object))}


def seg_miou(pred, true):
    """Object mIoU over (image, true object) pairs; background ids 0 and 1 are not objects."""
    ious = [((p == k) & m).sum() / ((p == k) | m).sum()
            for p, t in zip(pred, true) for k in np.unique(t) if k >= 2 for m in [t == k]]
    return float(np.mean(ious)) if ious else float("nan")


def seg_miou_matched(pred, true):
    """seg_miou with each image's predicted object ids matched one-to-one to its true objects
    (greedily, best IoU first) instead of compared by palette index. The gap to seg_miou is what
    drawing the right shapes in the wrong colours costs: the canonical left-to-right colour order
    is a fact about the whole image, harder to learn than an object's outline."""
    ious = []
    for p, t in zip(pred, true):
        ts, ps = [k for k in np.unique(t) if k >= 2], [k for k in np.unique(p) if k >= 2]
        iou = np.array([[((p == a) & (t == b)).sum() / ((p == a) | (t == b)).sum() for a in ps] for b in ts])
        best = np.zeros(len(ts))
        while iou.size and iou.max() > 0:
            b, a = np.unravel_index(iou.argmax(), iou.shape)
            best[b], iou[b, :], iou[:, a] = iou[b, a], -1, -1
        ious += list(best)
    return float(np.mean(ious)) if ious else float("nan")


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
def generate_map_codes(model, tok, convs, images, n_image_tokens, batch_size=64, **sampling):
    """For each (conversation ending in a user turn that asks for a map, images) pair, the N codes
    of the map the model draws. The prompt ends with <|image|>: the instruction asked for a map, so
    the reply starts as one and the sampler's image mode yields exactly N codes."""
    sampling = one_stream(model, sampling)
    out = []
    for chunk in _chunks(list(zip(convs, images)), batch_size):
        prompts = [tok.render_prompt(c, im) + [tok.image_start] for c, im in chunk]
        gen = sampler.generate(model, tok, prompts, n_image_tokens + 1, n_image_tokens, tools=False, **sampling)
        out += [np.array(gen.row(b)[:n_image_tokens]) - tok.image_offset for b in range(len(chunk))]
    return out


def scene_codes(codes, i):
    return dict(zip(data.MODALITIES, codes[i]))


def map_quality(model, tok, vq, split, codes, scene_ids, n_image_tokens, **sampling):
    """Depth and segmentation maps generated from each scene's RGB codes on the stage-1
    instructions, decoded by the VQ and scored against the truth. Also returns the decoded maps."""
    ids = list(scene_ids)
    maps, sampling = {}, one_stream(model, sampling)
    for tool in ("depth", "seg"):
        gen = generate_map_codes(model, tok, [conversations.map_request(tool)[:1]] * len(ids),
                                 [scene_codes(codes, i) for i in ids], n_image_tokens, **sampling)
        maps[tool] = vq.decode(np.stack(gen)).numpy()
    true_seg, seg = split["seg"][ids], data.rgb_to_seg(maps["seg"])
    metrics = depth_metrics(data.rgb_to_depth(maps["depth"], vq.depth_encoding), split["depth"][ids], true_seg)
    metrics["seg_miou"], metrics["seg_miou_matched"] = seg_miou(seg, true_seg), seg_miou_matched(seg, true_seg)
    return metrics, maps


def interleaved_budget(tok, n_image_tokens, text_tokens=256, tools=True):
    """New tokens an interleaved reply may take: its text plus room for MAX_TURNS-1 maps, each
    <|image|>, N codes, <|/image|> and the reflection prompt."""
    return text_tokens + ((MAX_TURNS - 1) * (n_image_tokens + 2 + len(tok.reflection_ids)) if tools else 0)


@torch.no_grad()
def answer(model, tok, questions, codes, n_image_tokens, mode="direct", batch_size=64, max_answer_tokens=None,
           tools=True, **sampling):
    """Reply to each question; returns the reply ids of each. Modes:
    direct       RGB + question -> answer (Base, stage 1)
    chain        the PE arm the paper's way: the model generates depth, then segmentation, then answers
                 with its own maps in context
    interleaved  RGB + question -> the model's own reasoning, tool calls and maps (stage 2, RL); the
                 budget is max_answer_tokens of text plus room for MAX_TURNS-1 maps. tools=False
                 masks the tool calls (the text-only RE arm)
    max_answer_tokens (of text) defaults to 24, or 256 in interleaved mode, where it covers the thinking."""
    replies, sampling = [], one_stream(model, sampling)
    for chunk in _chunks(questions, batch_size):
        images = [scene_codes(codes, q["scene"]) for q in chunk]
        if mode == "chain":
            convs = [conversations.perception_chain(q, answer=False) for q in chunk]
            images = [{"rgb": im["rgb"]} for im in images]  # the true maps are never shown
            for tool, upto in (("depth", 1), ("seg", 3)):
                drawn = generate_map_codes(model, tok, [c[:upto] for c in convs], images, n_image_tokens,
                                           batch_size=batch_size, **sampling)
                images = [dict(im, **{tool: d}) for im, d in zip(images, drawn)]
        elif mode in ("direct", "interleaved"):
            convs = [conversations.vqa_conversation(q, answer=False) for q in chunk]
        else:
            raise ValueError(f"unknown answer mode {mode!r}")
        prompts = [tok.render_prompt(c, im) for c, im in zip(convs, images)]
        budget, use_tools = max_answer_tokens or 24, False
        if mode == "interleaved":
            budget, use_tools = interleaved_budget(tok, n_image_tokens, max_answer_tokens or 256, tools), tools
        gen = sampler.generate(model, tok, prompts, budget, n_image_tokens, tools=use_tools, **sampling)
        replies += [gen.row(b) for b in range(len(chunk))]
    return replies


@torch.no_grad()
def answer_given(model, tok, questions, split, codes, n_image_tokens, upto, batch_size=64, **sampling):
    """Interleaved replies with the truth forced into them, to see what limits an interleaved arm.
    Each question's stage-2 trace (conversations.trace_conversation, which reads the true maps) is
    forced up to a point and the model writes the rest: upto="map" forces the plan, the tool call,
    the true map (its VQ codes) and the reflection prompt, so the model reads a perfect map and
    answers; upto="reading" also forces the trace's reading of it, so the model only answers. (A
    question the trace answers without a tool: "map" forces nothing, "reading" its text reading.)
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
            *user, reply = conversations.trace_conversation(q, split["scenes"][s], readings[s])
            parts = reply["content"]  # [think, tool, image, forced, think, answer] or [think, answer]
            cut = len(parts) - 1 if upto == "reading" else max([i + 1 for i, p in enumerate(parts) if "forced" in p], default=0)
            ids = tok.render_conversation(user + [{"role": "assistant", "content": parts[:cut]}], scene_codes(codes, s))[0]
            prompts.append(ids[:-1])  # rendering closed the turn with <|eos|>: the reply goes on
            forced.append(ids[ids.index(tok.assistant) + 1:-1])  # the reply starts after <|assistant|>
        gen = sampler.generate(model, tok, prompts, budget, n_image_tokens, **sampling)
        replies += [f + gen.row(b) for b, f in enumerate(forced)]
    return replies


def vqa_accuracy(tok, questions, replies, chance=None):
    """Per-category mean score of the replies' answers (and of the chance baseline), plus the mean
    over categories."""
    per = collections.defaultdict(list)
    base = collections.defaultdict(list)
    for q, s in zip(questions, question_scores(tok, questions, replies)):
        per[q["category"]].append(s["score"])
        if chance:
            base[q["category"]].append(chance(q))
    out = {f"acc_{c}": float(np.mean(v)) for c, v in sorted(per.items())}
    out["vqa_acc"] = float(np.mean([np.mean(v) for v in per.values()]))
    if chance:
        out["chance_acc"] = float(np.mean([np.mean(v) for v in base.values()]))
    return out


def tool_use(tok, questions, replies):
    """What interleaved replies did with their tools: format_valid (the fraction that parse as a
    well-formed reply, tokenizer.parse_reply, the RL format reward's parser), tool_pattern (the
    fraction whose calls are exactly the question's flag: only depth, only segmentation, or no tool
    for "none"; data.TOOL_FOR), and per category use_{depth,seg,none}_{category} (the fraction of
    replies calling depth / segmentation at least once / no tool) and pattern_{category}."""
    valid, follows = [], collections.defaultdict(list)
    use = collections.defaultdict(lambda: collections.defaultdict(list))
    for q, r in zip(questions, replies):
        error = tok.parse_reply(r)[1]
        called = {t for t, o in tok.tool_open.items() if o in r}  # malformed replies' calls count too
        valid.append(error is None)
        follows[q["category"]].append(called == {q["tool"]} - {"none"})
        for t in ("depth", "seg"):
            use[q["category"]][t].append(t in called)
        use[q["category"]]["none"].append(not called)
    out = {"format_valid": float(np.mean(valid)), "tool_pattern": float(np.mean([x for v in follows.values() for x in v]))}
    for c in sorted(use):
        out[f"pattern_{c}"] = float(np.mean(follows[c]))
        out.update({f"use_{t}_{c}": float(np.mean(v)) for t, v in use[c].items()})
    return out


def balanced_sample(questions, n, seed=0):
    """Up to n questions, the same number from each category, in a fixed order."""
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
    rows = []
    for k, i in enumerate(scene_ids):
        cells = [split["rgb"][i], maps["depth"][k], data.depth_to_rgb(split["depth"][i], vq_encoding),
                 maps["seg"][k], data.seg_to_rgb(split["seg"][i])]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid).save(path)


# --- the Table 1 experiment (DESIGN §6) ----------------------------------------------------------
# arm -> (checkpoint under a run root, how it answers, tools in reasoning, paper's counterpart)
ARMS = {
    "Base": ("base", "direct", False, "BAGEL"),
    "PE": ("stage1", "chain", False, "BAGEL-PE"),
    "RE": ("rl_text", "interleaved", False, "BAGEL-RE"),
    "COOPER": ("rl", "interleaved", True, "COOPER"),
}


def question_scores(tok, questions, replies):
    """Per question: its category, score, and δ<2 for numbers."""
    out = []
    for q, r in zip(questions, replies):
        text = tok.answer_of(tok.parse_reply(r)[0])
        d2 = within_factor_2(parse_number(text, q["unit"]), q["value"]) if q["answer_type"] == "number" else None
        out.append({"category": q["category"], "score": score_answer(q, text), "delta2": d2})
    return out


def evaluate_arm(arm, roots, data_dir, vq_ckpt, n_questions, n_map_scenes, batch_size, report_dir):
    """One arm of the Table 1 analog, every seed's checkpoint of it: per-question scores, tool use
    (interleaved arms), map quality (PE, COOPER), the PE map grid and the COOPER example trace
    (written to report_dir). eval.py runs arms side by side in worker processes, one thread each:
    decoding is many small ops, for which a second thread buys little and a second process doubles
    the work done."""
    import tokenizer
    import trainer
    import vqgan
    torch.set_num_threads(1)
    t0 = time.time()
    stage, mode, use_tools, _ = ARMS[arm]
    vq = vqgan.load_vqgan(vq_ckpt)
    tok = tokenizer.Tokenizer.load(os.path.join(data_dir, "tokenizer.tiktoken"), vq.cfg.codebook_size)
    test = data.load_split(data_dir, "test")
    codes = vqgan.load_codes(data_dir, "test").astype(np.int64)
    n_image = codes.shape[-1]
    qs = balanced_sample(test["questions"], n_questions)
    out = {"per_seed": [], "per_seed_direct": [], "given": {"map": [], "reading": []}, "tools": [], "maps": [],
           "example": None}
    for root in roots:
        path = os.path.join(root, stage, "ckpt.pt")
        if not os.path.exists(path):
            print(f"{arm}: no checkpoint at {path}, skipped", flush=True)
            continue
        model, _ = trainer.load_model(path)
        print(f"{arm}: {path}, answering {len(qs)} test questions ({mode})", flush=True)
        replies = answer(model, tok, qs, codes, n_image, mode=mode, tools=use_tools, batch_size=batch_size, **DECODE)
        out["per_seed"].append(question_scores(tok, qs, replies))
        if arm == "PE":  # the PE arm both ways: direct answers as well as the paper's chain
            out["per_seed_direct"].append(question_scores(tok, qs, answer(model, tok, qs, codes, n_image, mode="direct",
                                                                          batch_size=batch_size, **DECODE)))
        if arm == "COOPER":  # what limits it: the same questions with the true map, then its true reading, forced in
            for upto, per_seed in out["given"].items():
                per_seed.append(question_scores(tok, qs, answer_given(model, tok, qs, test, codes, n_image, upto,
                                                                      batch_size=batch_size, **DECODE)))
        if mode == "interleaved":
            out["tools"].append(tool_use(tok, qs, replies))
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
