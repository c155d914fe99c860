"""
The Table 1 report: what eval.py's per-arm results become in report.md. Scores per
question are summarised per arm (mean ± standard error, over questions with one seed, over seeds'
means with several), set beside the paper's numbers, judged claim by claim, and written out with
the map-quality and tool-use tables, an example interleaved reply and the training curves.
Scoring itself (what counts as a right answer or a good map) is metrics.py's.
"""
import collections
import json
import os

import numpy as np

# the paper's Table 1 (SIBench / Q-Spatial / MMVP) for each arm's counterpart
PAPER = {"Base": (43.6, 47.5, 74.3), "PE": (48.3, 51.5, 72.7), "RE": (44.0, 48.5, 75.3), "COOPER": (50.1, 57.4, 78.7)}
SPATIAL = ("distance", "size", "depth_order", "relative_distance", "relation", "counting")


def summarise(per_seed):
    """[per-question scores of one seed] -> {metric: (mean, standard error)}. With one seed the error
    is over questions; with several it is over the seeds' means."""
    def metrics(scores):
        by = collections.defaultdict(list)
        for s in scores:
            by[s["category"]].append(s["score"])
            if s["delta2"] is not None:
                by[f"{s['category']}_delta2"].append(s["delta2"])
        m = {f"acc_{k}": float(np.mean(v)) for k, v in by.items()}
        m["spatial_avg"] = float(np.mean([m[f"acc_{c}"] for c in SPATIAL if f"acc_{c}" in m]))
        return m, by

    seeds = [metrics(s) for s in per_seed]
    out = {}
    for k in seeds[0][0]:
        vals = [m[k] for m, _ in seeds]
        if len(seeds) > 1:
            out[k] = (float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(len(vals))))
        elif k == "spatial_avg":  # an average of category means: combine their errors
            by = seeds[0][1]
            se = np.sqrt(sum(np.var(by[c], ddof=1) / len(by[c]) for c in SPATIAL if len(by.get(c, [])) > 1)) / len(SPATIAL)
            out[k] = (vals[0], float(se))
        else:
            cat = k[len("acc_"):]
            v = seeds[0][1][cat]
            out[k] = (vals[0], float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)
    return out


def distinct_answers(per_seed):
    """[per-question scores of one seed] -> {category: (distinct answers given, the mean over seeds;
    questions a seed)}. 1 is one constant answer for every question of the category: an arm that
    has learned only the answer prior."""
    counts, asked = collections.defaultdict(list), {}
    for scores in per_seed:
        by = collections.defaultdict(list)
        for s in scores:
            by[s["category"]].append(s["answer"])
        for c, answers in by.items():
            counts[c].append(len(set(answers)))
            asked[c] = len(answers)
    return {c: (float(np.mean(v)), asked[c]) for c, v in counts.items()}


KEEP_MARGIN = 5.0  # points of general accuracy COOPER may lose and still count as keeping it


def claims(table):
    """One sentence per claim of the paper: did it hold here? A difference counts when it exceeds
    twice its standard error."""
    def diff(a, b, key):
        (ma, sa), (mb, sb) = table[a][key], table[b][key]
        d, se = 100 * (ma - mb), 100 * np.hypot(sa, sb)
        return d, se, "held" if d > 2 * se else ("did not hold (no clear difference)" if abs(d) <= 2 * se else "did not hold (reversed)")

    out = []
    for a, b, key, paper in (("PE", "Base", "spatial_avg", "+4.7 on SIBench"),
                             ("COOPER", "Base", "spatial_avg", "+6.91 average spatial gain"),
                             ("COOPER", "PE", "spatial_avg", "+1.8 on SIBench"),
                             ("COOPER", "RE", "spatial_avg", "+6.1 on SIBench"),
                             ("PE", "Base", "acc_distance", "+7.92 on distance and size (with size)"),
                             ("PE", "Base", "acc_size", "+7.92 on distance and size (with distance)")):
        if a in table and b in table and key in table[a] and key in table[b]:
            d, se, verdict = diff(a, b, key)
            out.append(f"{a} beats {b} on {key} (paper: {paper}): {d:+.1f} ± {se:.1f} points here, {verdict}.")
    if "COOPER" in table and "Base" in table and "acc_general" in table["COOPER"]:
        # keeping an ability is shown only if the interval rules out a loss of more than KEEP_MARGIN
        # points; no clear loss with a wide interval is not the same thing
        d, se, _ = diff("COOPER", "Base", "acc_general")
        verdict = ("did not hold (a clear loss)" if d < -2 * se else "held" if d - 2 * se >= -KEEP_MARGIN
                   else f"not shown (no clear loss, but the interval allows one of up to {2 * se - d:.0f} points)")
        out.append(f"COOPER keeps general ability (paper: MMBench 72.2 → 80.6): {d:+.1f} ± {se:.1f} points on "
                   f"colour/shape questions, {verdict}.")
    return out


def line_chart(path, series, title, size=(360, 200)):
    """A bare PNG line chart with pillow (no plotting library here): {name: [(x, y)]}."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts) or 1
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y1 = y1 if y1 > y0 else y0 + 1
    box = (40, 20, size[0] - 10, size[1] - 25)
    d.rectangle(box, outline="black")
    d.text((box[0], 4), title, fill="black")
    d.text((2, box[1]), f"{y1:.3g}", fill="black")
    d.text((2, box[3] - 10), f"{y0:.3g}", fill="black")
    d.text((box[0], box[3] + 5), f"{x0:g}", fill="black")
    d.text((box[2] - 30, box[3] + 5), f"{x1:g}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for k, (name, s) in enumerate(series.items()):
        xy = [(box[0] + (x - x0) / max(x1 - x0, 1e-9) * (box[2] - box[0]),
               box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1])) for x, y in s]
        if len(xy) > 1:
            d.line(xy, fill=colours[k % len(colours)], width=2)
        d.text((box[2] - 120, box[1] + 4 + 12 * k), name, fill=colours[k % len(colours)])
    img.save(path)


def curves(run_root, report_dir):
    """Loss curves of the SFT stages and reward curves of RL, from their metrics.jsonl."""
    def read(stage, key):
        p = os.path.join(run_root, stage, "metrics.jsonl")
        rows = [json.loads(line) for line in open(p)] if os.path.exists(p) else []
        return [(r["iter"], r[key]) for r in rows if key in r]
    files = []
    for name, series in (("loss.png", {s: read(s, "loss") for s in ("stage1", "base", "stage2", "stage2_text")}),
                         ("reward.png", {s: read(s, "reward") for s in ("rl", "rl_text")})):
        series = {k: v for k, v in series.items() if v}
        if series:
            line_chart(os.path.join(report_dir, name), series, name[:-4] + " by iteration")
            files.append(name)
    return files


def run_config(run_root, stage):
    """A stage's saved config.json under a run root ({} if it saved none)."""
    p = os.path.join(run_root, stage, "config.json")
    return json.load(open(p)) if os.path.exists(p) else {}


def started_from(run_root, stage):
    """The init_from a stage's run was trained from, as its saved config says ("scratch" if none saved)."""
    return run_config(run_root, stage).get("init_from", "scratch")


def trace_markdown(tok, vq, q, reply, report_dir, name):
    """One interleaved reply as text, with the maps it drew saved as PNGs beside the report."""
    from PIL import Image
    parts, error = tok.parse_reply(reply)
    lines = [f"**Q:** {q['question']} (truth: {q['answer']})", ""]
    for k, p in enumerate(parts):
        (kind, value), = p.items()
        if kind == "image":
            img = vq.decode(np.asarray(value)[None]).numpy()[0]
            Image.fromarray(img).resize((128, 128), Image.NEAREST).save(os.path.join(report_dir, f"{name}_{k}.png"))
            lines.append(f"![map]({name}_{k}.png)")
        elif kind == "tool":
            lines.append(f"`<{'depth-estimation' if value == 'depth' else 'segmentation'}>` (tool call)")
        else:
            lines.append(f"`{kind}`: {value}")
    lines.append(f"\nformat: {'well-formed' if error is None else error}")
    return "\n\n".join(lines)


def write(report_dir, done, data_dir, n_questions, roots, evaluated):
    """report_dir/report.md from eval.evaluate_arm's results, {arm: result} in the report's order.
    Returns (the summarised table {arm: {metric: (mean, se)}}, the Table 1 markdown rows)."""
    table, extra, tools_table, maps_table, example, distinct = {}, {}, {}, {}, None, {}
    for arm, r in done.items():
        if r["per_seed"]:
            table[arm] = summarise(r["per_seed"])
            distinct[arm] = distinct_answers(r["per_seed"])
        if r["per_seed_direct"]:
            extra["PE (direct)"] = summarise(r["per_seed_direct"])
            distinct["PE (direct)"] = distinct_answers(r["per_seed_direct"])
        if r["per_seed_true_maps"]:
            extra["PE, true maps"] = summarise(r["per_seed_true_maps"])
        for upto, per_seed in r["given"].items():
            if per_seed:
                extra[f"COOPER, true {upto} forced"] = summarise(per_seed)
        if r["tools"]:
            tools_table[arm] = r["tools"]
        if r["maps"]:
            maps_table[arm] = r["maps"]
        example = example or r["example"]

    cols = ["spatial_avg", "acc_distance", "acc_size", "acc_depth_order", "acc_relative_distance", "acc_relation",
            "acc_counting", "acc_general", "acc_distance_delta2", "acc_size_delta2"]
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    rows = ["| model | " + " | ".join(c.replace("acc_", "") for c in cols) + " | paper (SIBench / Q-Spatial / MMVP) |",
            "|---" * (len(cols) + 2) + "|"]
    for arm, t in list(table.items()) + list(extra.items()):
        paper = PAPER.get(arm)
        rows.append(f"| {arm} | " + " | ".join(pct(t[c]) if c in t else "–" for c in cols)
                    + f" | {' / '.join(map(str, paper)) if paper else '–'} |")
    map_rows = ["| model | depth AbsRel | depth δ1 | object depth AbsRel | seg mIoU | seg mIoU, ids matched |",
                "|---|---|---|---|---|---|"]
    for arm, ms in maps_table.items():
        avg = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        map_rows.append(f"| {arm} | {avg['depth_absrel']:.3f} | {avg['depth_delta1']:.3f} | "
                        f"{avg['object_depth_absrel']:.3f} | {avg['seg_miou']:.3f} | {avg.get('seg_miou_matched', np.nan):.3f} |")
    cats = sorted({c for d in distinct.values() for c in d})
    distinct_rows = ["| model | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for arm, d in distinct.items():
        distinct_rows.append(f"| {arm} | " + " | ".join(f"{d[c][0]:g} of {d[c][1]}" if c in d else "–" for c in cats) + " |")
    tool_rows = []
    for arm, ts in tools_table.items():
        t = {k: float(np.mean([x[k] for x in ts])) for k in ts[0]}
        tool_rows.append(f"- **{arm}**: format valid {100 * t['format_valid']:.0f}%, tool choice follows the category "
                         f"pattern {100 * t['tool_pattern']:.0f}%; " + ", ".join(
                             f"{c}: depth {100 * t[f'use_depth_{c}']:.0f}% / seg {100 * t[f'use_seg_{c}']:.0f}%"
                             for c in sorted({k.split('_', 2)[2] for k in t if k.startswith('use_depth_')})))
    figures = curves(roots[0], report_dir)
    pe_from = started_from(roots[0], "stage1")
    brief = run_config(roots[0], "stage2").get("reading") == "brief"
    report = [
        "# nanoCOOPER report", "",
        f"Test split of `{data_dir}`: {n_questions} questions balanced over categories, {len(roots)} seed(s) "
        f"({', '.join(roots)}); text decoded greedily, map codes sampled at temperature 0.5 (`eval.DECODE`). "
        f"Accuracy in % (mean ± standard error{' over seeds' if len(roots) > 1 else ' over questions'}); "
        "numbers are MRA (and δ<2 in the last columns), choices/yes-no/counts exact match. "
        "The paper's columns are its benchmarks, not these: compare directions, not levels.", "",
        *rows, "",
        "What else differs from the paper: the base here is trained from scratch on the synthetic scenes "
        "(BAGEL is a pretrained 14B model); PE is the stage-1 checkpoint (Base's VQA examples plus map generation "
        f"and maps-in-context VQA, started from {'the Base arm' if pe_from.endswith('base/ckpt.pt') else pe_from}); RE and COOPER are the text-only and interleaved arms after SFT and GRPO"
        + (", whose traces end in one fixed thought rather than a reading of the map or image (`reading=brief`). " if brief else ". ")
        + "PE (direct) is the PE checkpoint answering from the RGB alone, and PE, true maps its chain with the "
        "scene's true depth and segmentation (their VQ codes) in place of its own: below PE (direct), the chain's "
        "format costs more than its maps. The last two rows ask what limits COOPER: "
        "its stage-2 trace is forced into the reply up to the true map (its VQ codes), or also the trace's "
        "last thought (the true reading of that map, or the fixed thought), and the model writes the rest (`eval.answer_given`). Where they are no better than COOPER's "
        "own row, its answers do not follow what it perceives.", "",
        "## Claims", "", *[f"- {c}" for c in claims(table)], "",
        "## Distinct answers", "",
        "How many different answers each arm gave to a category's questions (the mean over seeds): "
        "1 is one constant answer, the answer prior and nothing more.", "",
        *distinct_rows, "",
        "## Generated maps (stage-1 instruction, test scenes)", "", *map_rows, "",
        "![maps](maps_pe.png)" if "PE" in maps_table else "", "",
        "RGB | generated depth | true depth | generated segmentation | true segmentation", "",
        "## Tool use", "", *tool_rows, "",
        "## An interleaved reply (COOPER)", "", example or "(no COOPER checkpoint)", "",
        "## Curves", "", *[f"![{f}]({f})" for f in figures], "",
        f"Evaluated in {evaluated}.",
    ]
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    return table, rows
