"""
Benchmarks. Speed and memory targets live here, never in timed unit tests.

    python bench.py data            # one section
    python bench.py data model      # several

Each section prints a table of its figures and merges them into bench.json (flat keys, so a later
run of one section keeps the others' figures). The last line is `final: {json}` with this run's figures.
"""
import json
import os
import sys
import time


def bench_data():
    """Scenes per second for the full per-scene work of `python data.py` (render rgb+depth+seg,
    questions) on one core at the tiny preset's resolution."""
    import numpy as np
    import data
    n = 500
    t0 = time.perf_counter()
    for i in range(n):
        scene = data.render_scene([0, 0, i], data.SceneConfig())
        data.make_questions(scene["graph"], np.random.default_rng(i))
    dt = time.perf_counter() - t0
    return {"scenes_per_s": round(n / dt, 1), "data_resolution": data.SceneConfig().image_size}


SECTIONS = {"data": bench_data}


def main(argv):
    names = argv or ["--help"]
    if names[0] in ("-h", "--help") or any(n not in SECTIONS for n in names):
        bad = [n for n in names if n not in SECTIONS and not n.startswith("-")]
        if bad:
            print(f"unknown section(s): {', '.join(bad)}")
        print(f"usage: python bench.py SECTION [SECTION ...]   sections: {', '.join(SECTIONS)}")
        return 0 if not bad else 2
    results = {}
    for name in names:
        figures = SECTIONS[name]()
        print(f"\n== {name} ==")
        width = max(len(k) for k in figures)
        for k, v in figures.items():
            print(f"{k:<{width}}  {v}")
        results.update(figures)
    path = "bench.json"
    merged = json.load(open(path)) if os.path.exists(path) else {}
    merged.update(results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    print("final: " + json.dumps(results))
    return 0


if __name__ == "__main__":
    # one core, as the targets are stated; a section may raise it for its own measurement
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    sys.exit(main(sys.argv[1:]))
