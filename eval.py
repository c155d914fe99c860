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
"""
import collections
import re

import numpy as np
import torch

import data
import sampler
from tokenizer import MAX_TURNS

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
    """pred, true: metres (N, H, W); seg: true instance ids (N, H, W). Object pixels only."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    obj = seg >= 2
    rel = np.abs(pred[obj] - true[obj]) / true[obj]
    ratio = np.maximum(pred[obj] / true[obj], true[obj] / pred[obj])
    per_object = [abs(np.median(pred[i][m]) / np.median(true[i][m]) - 1)
                  for i in range(len(seg)) for k in np.unique(seg[i]) if k >= 2 for m in [seg[i] == k]]
    return {"depth_absrel": float(rel.mean()), "depth_delta1": float((ratio < 1.25).mean()),
            "object_depth_absrel": float(np.mean(per_object))}


def seg_miou(pred, true):
    """Object mIoU over (image, true object) pairs; background ids 0 and 1 are not objects."""
    ious = [((p == k) & m).sum() / ((p == k) | m).sum()
            for p, t in zip(pred, true) for k in np.unique(t) if k >= 2 for m in [t == k]]
    return float(np.mean(ious)) if ious else float("nan")


# --- running a model on the benchmarks (through the one sampler) -------------------------------
def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


@torch.no_grad()
def generate_map_codes(model, tok, convs, images, n_image_tokens, batch_size=64, **sampling):
    """For each (conversation ending in a user turn that asks for a map, images) pair, the N codes
    of the map the model draws. The prompt ends with <|image|>: the instruction asked for a map, so
    the reply starts as one and the sampler's image mode yields exactly N codes."""
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
    maps = {}
    for tool in ("depth", "seg"):
        gen = generate_map_codes(model, tok, [data.map_request(tool)[:1]] * len(ids),
                                 [scene_codes(codes, i) for i in ids], n_image_tokens, **sampling)
        maps[tool] = vq.decode(np.stack(gen)).numpy()
    metrics = depth_metrics(data.rgb_to_depth(maps["depth"], vq.depth_encoding), split["depth"][ids], split["seg"][ids])
    metrics["seg_miou"] = seg_miou(data.rgb_to_seg(maps["seg"]), split["seg"][ids])
    return metrics, maps


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
    replies = []
    for chunk in _chunks(questions, batch_size):
        images = [scene_codes(codes, q["scene"]) for q in chunk]
        if mode == "chain":
            convs = [data.perception_chain(q, answer=False) for q in chunk]
            images = [{"rgb": im["rgb"]} for im in images]  # the true maps are never shown
            for tool, upto in (("depth", 1), ("seg", 3)):
                drawn = generate_map_codes(model, tok, [c[:upto] for c in convs], images, n_image_tokens,
                                           batch_size=batch_size, **sampling)
                images = [dict(im, **{tool: d}) for im, d in zip(images, drawn)]
        elif mode in ("direct", "interleaved"):
            convs = [data.vqa_conversation(q, answer=False) for q in chunk]
        else:
            raise ValueError(f"unknown answer mode {mode!r}")
        prompts = [tok.render_prompt(c, im) for c, im in zip(convs, images)]
        budget, use_tools = max_answer_tokens or (256 if mode == "interleaved" else 24), False
        if mode == "interleaved":  # each map: <|image|>, N codes, <|/image|>, the reflection prompt
            budget += (MAX_TURNS - 1) * (n_image_tokens + 2 + len(tok.reflection_ids)) if tools else 0
            use_tools = tools
        gen = sampler.generate(model, tok, prompts, budget, n_image_tokens, tools=use_tools, **sampling)
        replies += [gen.row(b) for b in range(len(chunk))]
    return replies


def vqa_accuracy(tok, questions, replies, chance=None):
    """Per-category mean score of the replies' answers (and of the chance baseline), plus the mean
    over categories."""
    per = collections.defaultdict(list)
    base = collections.defaultdict(list)
    for q, r in zip(questions, replies):
        parts, _ = tok.parse_reply(r)
        per[q["category"]].append(score_answer(q, tok.answer_of(parts)))
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
        parts, error = tok.parse_reply(r)
        called = {p["tool"] for p in parts if "tool" in p}
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
