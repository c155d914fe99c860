"""
How answers and maps are scored: one copy of every metric, so a number means the same in every
stage's `final:` line, in RL's accuracy reward, in the VQ's round trip and in the report.

Answers (the benchmarks' rules, rule-based, no judge model):
  - numbers (distance, size): the value is parsed with its unit and converted to the question's
    unit; a missing unit means the question's; a unit that is not a length scores 0. Scored by
    MRA, the mean over θ ∈ {.50, .55, …, .95} of [|pred − true| / true < 1 − θ] (VSI-Bench), and
    δ<2, whether pred is within a factor 2 of true (Q-Spatial);
  - choices, yes/no and counts: exact match after lower-casing and trimming punctuation.
Maps (depth in metres, segmentation as instance ids, against the renderer's truth):
  - depth AbsRel and δ1 (< 1.25) over object pixels; per-object AbsRel of the median depth inside
    each object's true mask (what a reasoning trace reads off a map);
  - segmentation object mIoU: IoU of each true object's mask with the pixels predicted as that id,
    averaged over (image, object); and the same with predicted ids matched to true objects.
Replies (token ids from the sampler): per-category accuracy, format validity and tool use.
Nothing here imports a model: the functions take arrays, records and a tokenizer.
"""
import collections
import re

import numpy as np

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
    drawing the right shapes in the wrong colours costs (a second object of one colour takes a
    spare entry, which depends on the other object: data.seg_palette_ids)."""
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


# --- replies ---------------------------------------------------------------------------------------


def question_scores(tok, questions, replies):
    """Per question: its category, score, δ<2 for numbers, and the answer the reply gave."""
    out = []
    for q, r in zip(questions, replies):
        text = tok.answer_of(tok.parse_reply(r)[0])
        d2 = within_factor_2(parse_number(text, q["unit"]), q["value"]) if q["answer_type"] == "number" else None
        out.append({"category": q["category"], "score": score_answer(q, text), "delta2": d2, "answer": text})
    return out


def vqa_accuracy(tok, questions, replies, chance=None):
    """Per-category mean score of the replies' answers (and of the chance baseline), plus the mean
    over categories; nothing for no questions."""
    if not questions:
        return {}
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


def paired_change(before, after):
    """The change in held-out accuracy from per-question scores of the same questions before and
    after: its mean, the standard error of that mean (paired, so how hard each question is cancels
    out), and how many questions scored higher and lower."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return {"acc_change": float(d.mean()), "acc_change_se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "questions_gained": int((d > 0).sum()), "questions_lost": int((d < 0).sum())}
