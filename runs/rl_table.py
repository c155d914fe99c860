"""
The curves of one or more RL runs (rl.py out_dirs, e.g. one per seed) as markdown tables and a PNG:
at every held-out evaluation, the accuracy of greedy replies (with its change from iteration 0,
paired by question) and the accuracy and CPR reward of sampled replies; the training reward in
windows of iterations; each category's greedy accuracy at the first and last evaluation.

    python runs/rl_table.py out/rl_long/s1337 out/rl_long/s2 --png=out/rl_long/curves.png
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import metrics  # noqa: E402
from report import line_chart  # noqa: E402


def load(run):
    """{name, evals: {iteration: metrics}, first, last (the first and last evaluation's metrics),
    train_rewards: [per iteration], scores: {iteration: per question}}."""
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    evals = {r["iter"]: r for r in rows if "heldout_vqa_acc" in r}
    evals[0] = json.load(open(os.path.join(run, "eval_start.json")))
    scores = {r["iter"]: r["scores"] for r in map(json.loads, open(os.path.join(run, "heldout_scores.jsonl")))}
    evals = dict(sorted(evals.items()))
    return {"name": os.path.basename(os.path.normpath(run)), "evals": evals, "first": evals[min(evals)], "last": evals[max(evals)],
            "train_rewards": np.array([r["reward"] for r in rows if "reward" in r]), "scores": scores}


def mean_se(x):
    return f"{x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="rl.py out_dirs")
    p.add_argument("--window", type=int, default=10, help="iterations per training-reward window")
    p.add_argument("--png", default="", help="also draw the held-out accuracy curves here")
    a = p.parse_args()
    runs = [load(r) for r in a.runs]
    nan = float("nan")

    print("| run | iteration | accuracy, greedy | paired change from 0 (points) | accuracy, sampled | reward, sampled |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in runs:
        for it, e in r["evals"].items():
            ch = metrics.paired_change(r["scores"][0], r["scores"][it]) if it else None
            change = f"{100 * ch['acc_change']:+.1f} ± {100 * ch['acc_change_se']:.1f}" if ch else ""
            print(f"| {r['name']} | {it} | {e['heldout_vqa_acc']:.3f} | {change} | {e.get('heldout_sampled_acc', nan):.3f} "
                  f"| {e.get('heldout_reward', nan):.3f} |")

    print(f"\n| run | training reward, mean ± s.e. over each {a.window} iterations |\n| --- | --- |")
    for r in runs:
        w = r["train_rewards"]
        print(f"| {r['name']} | " + "; ".join(f"{k + 1}–{min(k + a.window, len(w))}: {mean_se(w[k:k + a.window])}"
                                              for k in range(0, len(w), a.window)) + " |")

    cats = sorted(k for k in runs[0]["first"] if k.startswith("acc_"))
    print("\n| run | " + " | ".join(c[4:] for c in cats) + " |\n| --- |" + " --- |" * len(cats))
    for r in runs:
        print(f"| {r['name']} | " + " | ".join(f"{r['first'][c]:.2f} → {r['last'][c]:.2f}" for c in cats) + " |")

    if a.png:
        series = {}
        for r in runs:
            series[f"{r['name']} greedy"] = [(it, e["heldout_vqa_acc"]) for it, e in r["evals"].items()]
            series[f"{r['name']} sampled"] = [(it, e["heldout_sampled_acc"]) for it, e in r["evals"].items() if "heldout_sampled_acc" in e]
        line_chart(a.png, {k: v for k, v in series.items() if v}, "held-out accuracy by RL iteration", size=(560, 320))
        print(f"\nwrote {a.png}")

    final = {}
    for r in runs:
        e0, e1 = r["first"], r["last"]
        n = max(1, min(a.window, len(r["train_rewards"]) // 2))
        final[r["name"]] = {"acc_start": e0["heldout_vqa_acc"], "acc_end": e1["heldout_vqa_acc"],
                            "sampled_acc_start": e0.get("heldout_sampled_acc"), "sampled_acc_end": e1.get("heldout_sampled_acc"),
                            "reward_start": e0.get("heldout_reward"), "reward_end": e1.get("heldout_reward"),
                            "train_reward_start": float(r["train_rewards"][:n].mean()), "train_reward_end": float(r["train_rewards"][-n:].mean())}
        final[r["name"]] = {k: round(v, 4) if isinstance(v, float) else v for k, v in final[r["name"]].items()}
    print("final: " + json.dumps(final))


if __name__ == "__main__":
    main()
