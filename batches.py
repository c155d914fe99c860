"""
From a split's codes and conversations to the token batches every stage trains on.

A scene's three images live as VQ codes, (N, 3, h*w) per split (vqgan.encode_split); a
conversation (conversations.py) names the images it shows. `scene_codes` pairs the two,
`tok.render_conversation` turns them into (ids, loss_mask), and `make_batch` pads rows into the
(idx, targets, loss_mask) tensors of the training loop. Stage 1 draws from a mixture of example
kinds (`stage1_batch`), stage 2 from the balanced interleaved traces (`stage2_batch`); RL builds
its own rows from rollouts (rl.rollout_tensors).
"""
import collections
import math

import numpy as np
import torch

import conversations
import data
import grounding
import model


def scene_codes(codes, i):
    """Scene i's codes as {modality: (h*w,) codes}, the `images` a conversation is rendered with."""
    return dict(zip(data.MODALITIES, codes[i]))


def scene_pictures(rgb, items):
    """The pictures of the items' scenes (questions, traces: anything with a "scene"), uint8
    (N, H, W, 3), from a split's rgb: what a model that reads the question image's pixels is given
    beside its rows (model.py, "Image reader"). None without rgb."""
    return None if rgb is None else torch.from_numpy(np.asarray(rgb)[[it["scene"] for it in items]])


def make_batch(tok, rows, block_size):
    """[(ids, mask)] -> right-padded (idx, targets, loss_mask) tensors, trimmed to the longest row.
    Rows of branched_row's (ids, mask, branch) add a fourth tensor, the branches of idx (padding
    continues a row's last branch)."""
    longest = max(len(row[0]) for row in rows)
    if longest > block_size + 1:
        raise ValueError(f"an example of {longest} tokens does not fit block_size {block_size}: raise block_size")
    x = torch.full((len(rows), longest), tok.pad, dtype=torch.long)
    m = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, (ids, mask, *_) in enumerate(rows):
        x[r, :len(ids)], m[r, :len(mask)] = torch.tensor(ids), torch.tensor(mask)
    if len(rows[0]) == 2:
        return x[:, :-1], x[:, 1:], m[:, 1:]  # the mask belongs to the token being predicted
    br = torch.stack([torch.tensor(b + b[-1:] * (longest - len(b))) for _, _, b in rows])
    return x[:, :-1], x[:, 1:], m[:, 1:], br[:, :-1]


def branched_row(rows):
    """Rows [(ids, mask)] that begin alike (one image, then each its own question and answer) ->
    one row (ids, mask, branch): the shared beginning once (branch 0), then each row's rest as
    branch 1, 2, … The model lets a branch see only the beginning and itself (model.branch_layout),
    so each answer is learned exactly as in its own row, for the image's tokens paid once."""
    first, n = rows[0][0], min(len(ids) for ids, _ in rows)
    shared = next((t for t in range(n) if any(ids[t] != first[t] for ids, _ in rows)), n)
    ids, mask, branch = list(first[:shared]), list(rows[0][1][:shared]), [0] * shared
    for k, (i, m) in enumerate(rows, 1):
        ids, mask, branch = ids + i[shared:], mask + m[shared:], branch + [k] * (len(i) - shared)
    return ids, mask, branch


def stage1_batch(tok, codes, questions, rng, batch_size, block_size, weights, scenes=None, blind=False, per_image=1,
                 places=None, practice="file", branched=False, coverage=None, refer_heads=0, choose=False,
                 refer_options=False, map_questions=False, practice_weights=None, rgb=None, numbers=False, even_counts=False):
    """A batch from the stage-1 mixture; weights {kind: w} over vqa/depth/seg/chain. One kind per
    batch: the kinds differ in length by up to 3×, and a batch pads to its longest row, so mixing
    them within a batch would spend half the compute on padding. Over iterations the mixture holds.
    scenes (the split's scene records) say which scenes lack a true depth or seg map (real data,
    manifest.py): such a map is never a target, so those scenes sit out the kinds that draw it.
    blind=True shows VQA questions without their image (the blind baseline). per_image > 1 packs up
    to that many of a VQA scene's questions after its one image (conversations.packed_vqa), as many
    as fit in block_size: the others from the split's question file (practice="file"), or drawn
    fresh from every question the scene supports (data.practice_questions; "scene"), or those and
    the grounding drills ("drills"); the picked question always comes first, so the question file's
    category balance holds. practice_weights {category: w} draws the fresh ones' categories in
    proportion to w (1 for one not named; data.practice_questions): a category a model learns slowest
    can have more of the practice, and even_counts=True draws its counting questions evenly over the
    counts (data.practice_questions). Packed in turn, a later question can read its answer off an earlier
    one; branched=True packs them as branches instead (branched_row), each seeing only the image.
    With places (the split's grounding.place_labels) or branches, the batch gains a fourth item, the
    model's keyword tensors: {"places": each row's scene's labels for the place heads (-1 for a
    blind row), "branches": the branch of each token}. refer_heads > 0, with coverage (the split's
    grounding.place_coverage), adds the referring loss's targets to VQA batches that show the image:
    "refer_at", the question whose answer each position begins, and "refer", the places each
    question's object groups (grounding.referents) cover, up to refer_heads groups (losses.py, "Referring").
    choose=True adds "choose", the words of each multiple-choice question's answer option, and
    refer_options=True teaches the first referring head at each option's name to look at its object
    (losses.py, "Choosing"). map_questions=True asks questions after the maps too: a depth or seg
    example then asks up to per_image of its scene's questions after its map, and a chain example
    up to per_image - 1 more after its own (drawn fresh from the scene), so that every example
    trains answering, not only the VQA kind's; such a batch's loss mask weighs its text (the
    answers) as much as its map codes in all. rgb (the split's pictures) adds "rgb", each row's
    scene's picture, for a model that reads the question image's pixels (model.py, "Image reader").
    numbers=True adds "numbers", the number head's targets (number_targets), to the rows that ask."""
    kinds, w = zip(*[(k, v) for k, v in weights.items() if v > 0])
    kind = rng.choice(kinds, p=np.array(w) / sum(w))
    has = lambda i, m: scenes is None or scenes[i].get(f"has_{m}", True)
    if kind == "vqa":
        pool = questions
    elif kind == "chain":
        pool = [q for q in questions if has(q["scene"], "depth") and has(q["scene"], "seg")]
    else:
        pool = [i for i in range(len(codes)) if has(i, kind)]
    if practice not in ("file", "scene", "drills"):
        raise ValueError(f"practice must be file, scene or drills, got {practice!r}")
    if (practice_weights or even_counts) and practice == "file":
        raise ValueError("practice_weights and even_counts shape the questions drawn fresh from the scene: they need "
                         "practice='scene' or 'drills'")
    unknown = set(practice_weights or ()) - set(data.CATEGORIES) - set(data.DRILLS)
    if unknown or any(not isinstance(v, (int, float)) or v < 0 for v in (practice_weights or {}).values()):
        raise ValueError(f"practice_weights takes {{category: weight >= 0}} over {data.CATEGORIES} and the drills "
                         f"{data.DRILLS}; got {practice_weights!r}")
    if practice != "file" and (scenes is None or any("camera" not in g for g in scenes)):
        raise ValueError("practice questions are drawn from rendered scene graphs; real (manifest) data needs practice='file'")
    if not pool:
        raise ValueError(f"no scene has the maps stage-1 {kind} examples need: set {kind}_weight=0")
    if map_questions and (practice == "file" or per_image < 2):
        raise ValueError("map_questions draws its questions from the scene: it needs practice='scene' or 'drills' and per_image > 1")
    if refer_options and (refer_heads == 0 or scenes is None):
        raise ValueError("refer_options needs refer_heads > 0 and the split's scene graphs")
    if refer_heads > 0 and coverage is None:
        raise ValueError("refer_heads > 0 needs the split's place coverage (grounding.place_coverage)")
    by_scene = collections.defaultdict(list)
    for q in questions if kind == "vqa" and per_image > 1 and practice == "file" else ():
        by_scene[q["scene"]].append(q)
    if branched and per_image > 1:  # one question a row needs no branches (nor their mask's cost)
        pack = lambda qs, scene: branched_row([tok.render_conversation(conversations.vqa_conversation(q, image=not blind),
                                                                       scene_codes(codes, scene)) for q in qs])
    else:
        pack = lambda qs, scene: tok.render_conversation(conversations.packed_vqa(qs, image=not blind), scene_codes(codes, scene))
    rows, row_scenes, row_qs = [], [], []
    for _ in range(batch_size):
        pick = pool[rng.integers(len(pool))]
        if kind == "vqa":
            scene, qs = pick["scene"], [pick]
            if per_image > 1 and practice == "file":  # the picked question first, then others of its scene
                others = [q for q in by_scene[scene] if q is not pick]
                qs += [others[j] for j in rng.permutation(len(others))[:per_image - 1]]
            elif per_image > 1:
                qs += data.practice_questions(scenes[scene], rng, per_image - 1, practice == "drills", skip=pick,
                                              weights=practice_weights, even_counts=even_counts)
            render, keep = (lambda: pack(qs, scene)), 1
        else:
            scene = pick["scene"] if kind == "chain" else pick
            own = [pick] if kind == "chain" else []  # a chain asks its own question, after both maps
            conv = conversations.perception_chain(pick) if own else conversations.map_request(kind)
            qs = own + (data.practice_questions(scenes[scene], rng, per_image - len(own), practice == "drills",
                                                skip=pick if own else None, weights=practice_weights, even_counts=even_counts)
                        if map_questions else [])
            render = lambda: tok.render_conversation(conv + conversations.packed_vqa(qs[len(own):], image=False),
                                                     scene_codes(codes, scene))
            keep = len(own)
        row = render()
        while len(row[0]) > block_size + 1 and len(qs) > keep:  # a packed row asks what fits in the block
            qs.pop()
            row = render()
        rows.append(row)
        row_scenes.append(scene)
        row_qs.append(qs)
    x, y, m, *br = make_batch(tok, rows, block_size)
    extra = {"branches": br[0]} if br else {}
    if rgb is not None and not (blind and kind == "vqa"):  # for a model that reads the question image's pixels
        extra["rgb"] = torch.from_numpy(rgb[row_scenes])
    if places is not None:
        extra["places"] = (torch.from_numpy(places[row_scenes]) if not (blind and kind == "vqa")
                           else torch.full((batch_size, *places.shape[1:]), -1))
    if (refer_heads > 0 or choose) and (kind == "vqa" or map_questions) and not blind:
        covs = [coverage[s] for s in row_scenes] if refer_heads else None
        graphs = [scenes[s] for s in row_scenes] if refer_options else None
        extra.update(refer_targets(tok, x, m, row_qs, covs, refer_heads, choose, graphs))
    if numbers and (kind == "vqa" or map_questions):
        extra["numbers"] = number_targets(tok, x, m, row_qs)
    if map_questions and kind != "vqa":  # the batch's loss is a mean over its supervised tokens: without
        is_code = y >= tok.image_offset  # this its ~150 map codes a row would drown its ~7 answer tokens
        text, drawn = (m > 0) & ~is_code, (m > 0) & is_code
        m = m.float()
        m[text] *= drawn.sum() / text.sum().clamp(min=1)  # text and codes weigh alike: the loss is their means' mean
    return (x, y, m, extra) if extra else (x, y, m)


def place_targets(splits, n_image_tokens, object_head=False, depth_head=False, refer_heads=0, seg_head=False, codes=None,
                  anchor_head=False):
    """({split: grounding.place_labels}, {split: grounding.place_coverage}) for load_split's splits, each {}
    when its loss is off: what stage1_batch's places= and coverage= take. seg_head adds each
    place's code of the seg pseudo-image (from codes, by split) as a label, the seg head's;
    anchor_head each place's grounding.place_anchors after it, the model's order (model.PLACE_HEADS)."""
    side = math.isqrt(n_image_tokens)
    coverage = ({s: grounding.place_coverage(sp["seg"], side) for s, sp in splits.items()}
                if object_head or refer_heads or anchor_head else {})
    places = {}
    for s, sp in splits.items():
        cols = [grounding.place_labels(sp, side, object_head, depth_head, coverage.get(s))] if object_head or depth_head else []
        cols += [np.asarray(codes[s][:, data.MODALITIES.index("seg"), :, None], dtype=np.int64)] if seg_head else []
        cols += [grounding.place_anchors(sp["seg"], sp["scenes"], side, coverage[s])[..., None]] if anchor_head else []
        if cols:
            places[s] = np.concatenate(cols, -1)
    return places, coverage if refer_heads else {}


def vqa_rows(tok, questions, codes, blind=False):
    """Each question as one direct-answer row (ids, loss mask), with its scene's codes (or, blind,
    without the image): what evaluation and the probes score."""
    return [tok.render_conversation(conversations.vqa_conversation(q, image=not blind), scene_codes(codes, q["scene"]))
            for q in questions]


def answer_begins(tok, x, m):
    """(B, T) bool: the positions of rows x (loss mask m) whose token is a supervised <answer>, each
    the position that predicts its question's first answer word."""
    return (x == tok.answer) & (m == 1)


def refer_targets(tok, x, m, row_qs, coverages, heads, choose=False, graphs=None):
    """The referring and choosing losses' targets for VQA rows x (and their loss mask m) asking
    row_qs of scenes with place coverages. refer_at (B, T) names the entry of the targets each
    position takes: question k's <answer> (the position predicting its first answer word) entry k,
    -1 for positions that take none. With heads > 0, refer (B, entries, heads, places) bool: the
    places each entry's object groups (grounding.referents) cover. With graphs (the rows' scene
    graphs), the last token of each option's name takes an entry too, after the questions', whose
    head 0 looks at that option's object (grounding.option_objects). With choose, choose (B, entries, T)
    bool: each position that predicts a later word of a multiple-choice answer ("cube" of "red
    cube") takes an entry, after those, marking that word where the answer's option says it in
    the question."""
    begins = answer_begins(tok, x, m)
    refer_at = torch.where(begins, begins.long().cumsum(1) - 1, -1)
    assert begins.sum(1).tolist() == [len(qs) for qs in row_qs], "one <answer> a question"
    starts = [begins[r].nonzero().flatten().tolist() for r in range(len(x))]
    options = [[option_tokens(tok, x[r], start, q) if choose or graphs is not None else []  # only these losses need them
                for q, start in zip(qs, starts[r])] for r, qs in enumerate(row_qs)]
    copies = [[copied_words(tok, x[r], start, q, opts) if choose else []
               for q, start, opts in zip(qs, starts[r], options[r])] for r, qs in enumerate(row_qs)]
    per_row = [len(qs) + (sum(map(len, opts)) if graphs is not None else 0) + sum(map(len, cps))
               for qs, opts, cps in zip(row_qs, options, copies)]
    out = {"refer_at": refer_at}
    if heads:
        out["refer"] = torch.zeros(len(x), max(per_row), heads, coverages[0].shape[0], dtype=torch.bool)
    if choose:
        out["choose"] = torch.zeros(len(x), max(per_row), x.size(1), dtype=torch.bool)
    for r, qs in enumerate(row_qs):
        entry = len(qs)
        for k, q in enumerate(qs):
            for h, group in enumerate(grounding.referents(q)[:heads]):
                out["refer"][r, k, h] = torch.from_numpy(grounding.referent_places(coverages[r], group))
            if graphs is not None and heads and options[r][k]:
                for obj, words in zip(grounding.option_objects(q, graphs[r]), options[r][k]):
                    refer_at[r, words[-1]] = entry
                    out["refer"][r, entry, 0] = torch.from_numpy(grounding.referent_places(coverages[r], [obj]))
                    entry += 1
        for k in range(len(qs)):
            for at, word in copies[r][k]:
                refer_at[r, at] = entry
                out["choose"][r, entry, word] = True
                entry += 1
    return out


def number_targets(tok, x, m, row_qs):
    """(B, T) float: at each number question's <answer> in rows x (loss mask m) asking row_qs, the
    log of its answer in metres (sizes are asked in centimetres); NaN elsewhere (losses.py, "Numbers")."""
    out, begins = torch.full(x.shape, float("nan")), answer_begins(tok, x, m)
    for r, qs in enumerate(row_qs):
        for q, at in zip(qs, begins[r].nonzero().flatten().tolist()):
            if q["answer_type"] == "number":
                out[r, at] = math.log(max(q["value"], 1e-3) / (100 if q["unit"] == "cm" else 1))
    return out


def copied_words(tok, row, answer_at, q, options):
    """[(position, word)]: for a multiple-choice question q whose <answer> is at answer_at in row,
    each position predicting its answer's second word on, and the token of the question (among
    options, option_tokens' positions) that says that word; [] where the answer's tokens do not
    line up one to one with its option's ("red" begins an answer, " red" a question's option)."""
    if not options:
        return []
    said = options[q["choices"].index(q["answer"])]
    answer = tok.encode(q["answer"])
    assert row[answer_at + 1:answer_at + 1 + len(answer)].tolist() == answer, "an answer's words just after its <answer>"
    words = lambda ids: [tok.decode([int(t)]).strip() for t in ids]
    if words(answer) != words(row[said]):
        return []
    return [(answer_at + i, said[i]) for i in range(1, len(answer))]


def option_tokens(tok, row, answer_at, q):
    """[[positions]]: the tokens of row (ids) where each option of multiple-choice question q names
    its object (grounding.option_spans), q's words ending just before the <assistant><answer> at answer_at."""
    spans = grounding.option_spans(q)
    if not spans:
        return []
    words = tok.encode(q["question"])
    first = answer_at - 1 - len(words)
    assert row[first:answer_at - 1].tolist() == words, "a question's words just before its answer"
    _, offsets = tok.enc.decode_with_offsets(words)
    ends = offsets[1:] + [len(q["question"])]
    return [[first + j for j, (a, b) in enumerate(zip(offsets, ends)) if a < end and b > start] for start, end in spans]


def load_traces(split, tools, seed=0, reading="values"):
    """The balanced trace set of a split (load_split's dict; conversations.build_traces,
    balance_traces) and its statistics."""
    traces = conversations.balance_traces(conversations.build_traces(split, tools, reading), seed)
    return traces, conversations.trace_stats(traces)


def stage1_batches(tok, codes, questions, scenes, cfg, weights, places, coverage, blind=False, rgb=None):
    """get_batch(split, rng) over stage1_batch with a script's options: cfg's batch_size,
    block_size, questions_per_image, practice, practice_weights, even_counts, branched, refer_heads, choose,
    refer_options, map_questions, number_weight and map_noise; codes, questions, scenes, places and coverage by split (place_targets' dicts),
    and rgb, the splits' pictures, for a model that reads them (reader_pixels; None: not sent).
    train_stage1.py's batches, and bench.py learn's (blind=True: its blind model's, no image and no
    place labels)."""
    def get_batch(split, rng):
        batch = stage1_batch(tok, codes[split], questions[split], rng, cfg["batch_size"], cfg["block_size"], weights,
                            scenes[split], blind=blind, per_image=cfg["questions_per_image"],
                            places=None if blind else places.get(split), practice=cfg["practice"],
                            branched=cfg["branched"], coverage=coverage.get(split), refer_heads=cfg["refer_heads"],
                            choose=cfg["choose"], refer_options=cfg["refer_options"],
                            map_questions=cfg["map_questions"] and not blind, practice_weights=cfg["practice_weights"],
                            rgb=None if rgb is None else rgb[split], numbers=cfg.get("number_weight", 0) > 0,
                            even_counts=cfg.get("even_counts", False))
        if split == "train" and cfg.get("map_noise", 0) > 0:
            batch = (noisy_maps(tok, batch[0], codes[split].shape[-1], cfg["map_noise"], rng), *batch[1:])
        return batch
    return get_batch


def noisy_maps(tok, x, n_image_tokens, rate, rng):
    """x with each code of the maps it draws (every image code after a row's first image), as
    input only, replaced by a random code with probability rate; the targets keep the true codes.
    Teacher-forced, a map code is mostly copied from the true codes before it; drawing, the model
    reads its own, and one wrong code is copied onward. Trained on some wrong codes, it learns to
    draw from the photo instead. Measured, it narrowed that gap without lifting the drawn seg maps
    (docs/experiments.md, "A seg head at the photo's places …"), so it is off by default."""
    drawn = (x >= tok.image_offset) & ~model.first_image(x, tok.image_offset, n_image_tokens)
    hit = drawn & torch.from_numpy(rng.random(x.shape) < rate)
    random_codes = torch.from_numpy(rng.integers(tok.image_offset, tok.vocab_size, x.shape))
    return torch.where(hit, random_codes, x)


def stage2_batch(tok, codes, traces, rng, batch_size, block_size, places=None, coverage=None, refer_heads=0, rgb=None,
                 numbers=False):
    """A batch of traces, rendered with their scene's codes (the true maps stand in for the ones
    the model will draw). With places (the split's grounding.place_labels) or refer_heads > 0 (with
    the split's coverage), a 4th item carries stage 1's place and referring targets for the rows,
    as stage1_batch gives them: the referring loss then looks from each trace's <answer>; numbers=True
    adds the number head's (number_targets), there too. rgb (the split's pictures) adds "rgb", as
    stage1_batch does."""
    picked = [traces[i] for i in rng.integers(len(traces), size=batch_size)]
    rows = [tok.render_conversation(t["conversation"], scene_codes(codes, t["scene"])) for t in picked]
    x, y, m = make_batch(tok, rows, block_size)
    if places is None and not refer_heads and rgb is None and not numbers:
        return x, y, m
    extra = {} if places is None else {"places": torch.from_numpy(places[[t["scene"] for t in picked]])}
    if rgb is not None:
        extra["rgb"] = scene_pictures(rgb, picked)
    if refer_heads:
        extra.update(refer_targets(tok, x, m, [[t["question"]] for t in picked],
                                   [coverage[t["scene"]] for t in picked], refer_heads))
    if numbers:
        extra["numbers"] = number_targets(tok, x, m, [[t["question"]] for t in picked])
    return x, y, m, extra
