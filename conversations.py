"""
What the model reads and writes: the conversations every stage trains and is judged on, built from
data.py's scenes and questions (COOPER §3.2).

  - map_request, vqa_conversation, perception_chain: stage 1's tasks and the Base and PE arms
  - trace_conversation, build_traces, balance_traces: stage 2a's interleaved reasoning traces and
    the balanced SFT set; every value a trace reads off a map is the one the true map shows
  - corpus_texts: all of that as plain text, with the paper's fixed prompts, for the BPE tokenizer

A conversation is a plain list of turns; tokenizer.render_conversation turns it into tokens. It
lives apart from data.py because writing what a correct answer says is a different idea from
rendering the scene it is about.
"""
import collections
import math
import re

import numpy as np

import data

# Paper text (COOPER §3): the two tool instructions and the prompt forced after a generated map.
DEPTH_INSTRUCTION = "Estimate the depth of the image and generate the depth map."
SEG_INSTRUCTION = "Segment the objects in the image with different colors."
REFLECTION_PROMPT = "Above is the generated image. Continue reasoning based on it."


# --- direct conversations: stage 1's tasks, the Base and PE arms -------------------------------
# Images are named by modality; the scene's codes fill them in at render time.
def map_request(tool):
    """Stage 1's generation task: RGB plus the tool's instruction -> the map as a direct reply."""
    return [{"role": "user", "content": [{"image": "rgb"}, {"tool": tool}]},
            {"role": "assistant", "content": [{"image": tool}]}]


def vqa_conversation(q, answer=True, image=True):
    """RGB, question -> a direct answer (the Base arm's and stage 1's plain VQA). image=False
    leaves the picture out: the blind baseline, which can only learn answer priors."""
    conv = [{"role": "user", "content": [{"image": "rgb"}] * image + [{"text": q["question"]}]}]
    return conv + [{"role": "assistant", "content": [{"answer": q["answer"]}]}] if answer else conv


def packed_vqa(qs, image=True):
    """Several questions about one scene after one image, each answered in turn. Every answer is
    supervised, so one image's tokens buy len(qs) answers where vqa_conversation buys one; the
    first question is asked exactly as vqa_conversation asks it."""
    return [turn for k, q in enumerate(qs) for turn in vqa_conversation(q, image=image and k == 0)]


def perception_chain(q, answer=True):
    """The PE arm, judged the paper's way: generate depth, then segmentation, then answer with both
    maps in context. Stage 1 trains on it with the true maps."""
    conv = map_request("depth") + [{"role": "user", "content": [{"tool": "seg"}]},
                                   {"role": "assistant", "content": [{"image": "seg"}]},
                                   {"role": "user", "content": [{"text": q["question"]}]}]
    return conv + [{"role": "assistant", "content": [{"answer": q["answer"]}]}] if answer else conv


# --- interleaved reasoning traces (stage 2a, COOPER §3.2) ---------------------------------------
# A trace answers one question the way the COOPER model should: plan, call the tool the question's
# flag names, read values off the map it drew, answer. Every number in the reading is computed
# from the true depth and segmentation arrays (the median true depth inside an object's true mask,
# the pixel extent and centre column of the mask, the number of segments), i.e. it is what a
# correct map shows, so a model that draws the map right and reads it right writes this trace:
#   RGB, question -> <think>plan</think><tool>instruction</tool><|image|>map<|/image|>REFLECTION_PROMPT
#                    <think>values read off the map</think><answer>…</answer>
# Questions flagged "none" (colour, shape) get the text-only form <think>…</think><answer>…</answer>,
# and so does every question in the RE arm (tools="none"), whose thinking quotes only what the
# RGB image shows (where each object is, how many pixels it spans), never a map value.
# Every trace has one tool call at most (2 turns; MAX_TURNS allows 3). See `balance_traces` for
# how the training set is balanced.
#
# reading="brief" replaces the final <think>'s reading with one fixed sentence (BRIEF), so the
# answer follows the question and the map, as in stage 1's chain, rather than a reading the model
# must write first. At the tiny preset the model does not learn to write correct readings (it
# copies the wrong objects' names, and its answers follow what it wrote), while it does answer
# from the image; the brief trace keeps much of that skill through SFT (docs/experiments.md). A
# brief trace without a tool is that sentence alone, with no plan before it.
PLANS = {  # the first <think> of a trace, by question kind: why this tool (or none) helps
    "distance": "Distances need depth, so I will estimate a depth map.",
    "size": "Real size follows from image size and depth, so I will estimate a depth map.",
    "depth_order": "Which object is nearer is read from depth, so I will estimate a depth map.",
    "relative_distance": "Distances between objects need depth, so I will estimate a depth map.",
    "relation_front": "Front and back are read from depth, so I will estimate a depth map.",
    "relation_left": "Left and right are read from where each segment lies, so I will segment the image.",
    "counting": "Counting is easiest on separate segments, so I will segment the image.",
    "general": "Color and shape show in the image itself, so no map is needed.",
}


def map_readings(depth, seg):
    """What a correct pair of maps shows about each object: {id: {"depth": median depth (m) inside
    its mask, "x", "y": mask centre (column, row), "w", "h": columns and rows the mask spans}}."""
    out = {}
    for k in np.unique(seg):
        if k < 2:
            continue
        rows, cols = np.nonzero(seg == k)
        out[int(k)] = {"depth": float(np.median(depth[rows, cols])), "x": float(cols.mean()), "y": float(rows.mean()),
                       "w": int(cols.max() - cols.min() + 1), "h": int(rows.max() - rows.min() + 1)}
    return out


def _reading(q, names, readings, source):
    """The sentence that reads a question's objects off the `source`: "depth" or "seg" (a map), or
    "rgb" (the image alone: position and pixel extent, the RE arm's only evidence)."""
    kind, ids = q["kind"], [i for i in q.get("objects", []) if i in readings]
    called = {i: f"the {n}" for i, n in names.items()}
    if "options" in q:  # multiple choice: the options in the question's order
        id_of = {n: i for i, n in names.items()}
        # relative distance: the object the question asks about comes first, as "it"
        anchor = [q["objects"][0]] if kind == "relative_distance" and q["objects"][0] in readings else []
        called.update({i: "it" for i in anchor})
        ids = anchor + [id_of[n] for n in q["options"] if id_of[n] in readings]

    def say(i):
        r = readings[i]
        if source == "seg":
            return f"{called[i]} is the segment at column {round(r['x'])}"
        if source == "rgb":
            return f"{called[i]} is at column {round(r['x'])}, row {round(r['y'])}, {r['h']} pixels tall and {r['w']} wide"
        said = f"{called[i]} is at {r['depth']:.1f} m"
        if kind == "size":  # the apparent extent, which with depth gives the real size
            return said + (f" and {r['h']} pixels tall" if "tall" in q["question"] else f" and {r['w']} pixels wide")
        if kind in ("distance", "relative_distance") and len(ids) > 1:  # sideways offsets count too
            return said + f", column {round(r['x'])}"
        return said

    group = re.fullmatch(r"How many (.+) are there\?", q["question"])
    if kind == "counting" and group:
        cols = " and ".join(str(round(readings[i]["x"])) for i in ids)
        found = f"{group.group(1)} among them: {len(ids)}" + (f", at column{'s' if len(ids) > 1 else ''} {cols}" if ids else "")
        if source == "rgb":
            return f"I see {len(readings)} objects; {found}."
        return f"The segmentation map shows {len(readings)} segments; {found}."
    if not ids or not names:  # real data: no scene graph to name objects, so summarise the map
        d = [r["depth"] for r in readings.values() if math.isfinite(r["depth"])]
        if source == "depth" and d:
            return f"The depth map shows {len(readings)} objects, from {min(d):.1f} m to {max(d):.1f} m."
        return f"The {'segmentation map' if source == 'seg' else 'image'} shows {len(readings)} objects."
    where = {"depth": "In the depth map", "seg": "In the segmentation map", "rgb": "In the image"}[source]
    said = "; ".join(say(i) for i in ids)
    if source == "depth" and kind in ("depth_order", "relation_front") and len(ids) == 2:
        # say how the second depth compares with the first: a one-word step between the two numbers
        # and the answer, which the tiny model learns in half the steps (runs/probe_comparison.py)
        said += ", nearer" if readings[ids[1]]["depth"] < readings[ids[0]]["depth"] else ", farther"
    return f"{where} {said}."


BRIEF = "I answer from what I see."  # the final <think> of a reading="brief" trace
# the first <think> of a brief trace that calls a tool: one sentence a tool, so the choice is one
# word. With the seven PLANS the tiny model once blended two ("I an segment lies, so I will segment
# the image.") and answered without the map, and SFT kept less of stage 1 (docs/experiments.md)
BRIEF_PLANS = {"depth": "I will estimate a depth map.", "seg": "I will segment the image."}
READINGS = ("values", "brief")


def trace_conversation(q, scene, readings, tools="all", reading="values"):
    """The SFT conversation for question q of `scene` (its graph), given map_readings of the scene.
    tools="all": the COOPER trace (the flagged tool, or text only for "none"); tools="none": the
    RE arm's text-only chain of thought. reading="values": the final <think> reads the question's
    objects off the map (or the RGB); "brief": it is BRIEF."""
    if reading not in READINGS:
        raise ValueError(f"reading={reading!r}: expected one of {', '.join(READINGS)}")
    names = {o["id"]: data.name(o) for o in scene.get("objects", [])}
    tool = q.get("tool", "none") if tools == "all" else "none"
    user = [{"role": "user", "content": [{"image": "rgb"}, {"text": q["question"]}]}]
    if tool == "none":
        # brief: BRIEF alone, as in the RE arm; after the plan ("… so no map is needed") a tiny
        # model answered colour questions with a shape word
        lead = PLANS["general"] + " " if q["kind"] == "general" and tools == "all" and reading == "values" else ""
        thought = lead + (BRIEF if reading == "brief" else _reading(q, names, readings, "rgb"))
        return user + [{"role": "assistant", "content": [{"think": thought}, {"answer": q["answer"]}]}]
    plan = BRIEF_PLANS[tool] if reading == "brief" else PLANS.get(q["kind"], f"A {tool} map will help, so I will generate one.")
    reply = [{"think": plan}, {"tool": tool}, {"image": tool}, {"forced": REFLECTION_PROMPT},
             {"think": BRIEF if reading == "brief" else _reading(q, names, readings, tool)}, {"answer": q["answer"]}]
    return user + [{"role": "assistant", "content": reply}]


def build_traces(split, tools="all", reading="values"):
    """A trace for every question of a split (load_split's dict): [{"scene", "category", "kind",
    "tool" (the tool the trace calls, or "none"), "conversation", "question" (q itself)}]; tools
    and reading as trace_conversation takes them."""
    readings, out = {}, []
    for q in split["questions"]:
        s = q["scene"]
        if s not in readings:  # a brief trace reads nothing off its maps
            readings[s] = map_readings(split["depth"][s], split["seg"][s]) if reading == "values" else {}
        conv = trace_conversation(q, split["scenes"][s], readings[s], tools, reading)
        used = [p["tool"] for p in conv[-1]["content"] if "tool" in p]
        out.append({"scene": s, "category": q["category"], "kind": q["kind"], "tool": used[0] if used else "none",
                    "conversation": conv, "question": q})
    return out


def balance_traces(traces, seed=0, per_category=None):
    """The SFT set: the same number of traces from every category (the smallest category's count
    unless per_category is given), and within a category as even a split over its question kinds
    as the data allows (relation: half "in front of" with depth, half "left of" with segmentation).

    Tool / no tool: the tool is fixed by the question's kind (data.TOOL_FOR), so equal categories fix
    the tool mix: 6 of 7 categories call a tool (depth ~64%, segmentation ~21%), general (~14%) does
    not. We keep categories equal instead of forcing 50/50 tool/no-tool (which would need six times
    as many colour/shape questions): what the model must learn is *which* tool a question needs,
    and the no-tool choice is cued by the wording, so a seventh of the data teaches it (eval's
    tool_use shows whether it did). The set's statistics: `trace_stats`."""
    rng = np.random.default_rng(seed)
    by_cat = collections.defaultdict(lambda: collections.defaultdict(list))
    for t in traces:
        by_cat[t["category"]][t["kind"]].append(t)
    n = per_category or min(sum(len(v) for v in kinds.values()) for kinds in by_cat.values())
    out = []
    for cat in sorted(by_cat):
        pools = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_cat[cat].items())]
        picked = []
        while len(picked) < n and any(pools):  # round robin over kinds: even while every kind lasts
            for pool in pools:
                if pool and len(picked) < n:
                    picked.append(pool.pop())
        out += picked
    return [out[i] for i in rng.permutation(len(out))]


def trace_stats(traces):
    """Counts of a trace set by category, kind, tool called and number of assistant turns."""
    turns = collections.Counter(1 + sum("tool" in p for p in t["conversation"][-1]["content"]) for t in traces)
    return {"traces": len(traces), "category": dict(sorted(collections.Counter(t["category"] for t in traces).items())),
            "kind": dict(sorted(collections.Counter(t["kind"] for t in traces).items())),
            "tool": dict(sorted(collections.Counter(t["tool"] for t in traces).items())), "turns": dict(sorted(turns.items()))}


def trace_texts(split):
    """The text of both arms' traces of a split, for the BPE corpus."""
    texts = set()
    for tools in ("all", "none"):
        for t in build_traces(split, tools):
            texts.update(v for p in t["conversation"][-1]["content"] for k, v in p.items() if k in ("think", "answer"))
    return sorted(texts)


def text_corpus(data_dir, split="train"):
    """The dataset's own text, for training the BPE tokenizer: questions, answers and the
    reasoning of both arms' stage-2 traces (`trace_texts`)."""
    qs = data.load_questions(data_dir, split)
    return [q["question"] for q in qs] + [q["answer"] for q in qs] + trace_texts(data.load_split(data_dir, split))


def corpus_texts(data_dir):
    """Every string the models read or write, for training the BPE: the fixed prompts and the
    train split's text."""
    return [DEPTH_INSTRUCTION, SEG_INSTRUCTION, REFLECTION_PROMPT] + text_corpus(data_dir, "train")
