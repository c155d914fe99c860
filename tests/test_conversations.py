"""conversations.py: the trace builder's balance and statistics, and that every value a trace reads
off a map is what the true map shows and supports the true answer."""
import collections
import re

import numpy as np
import pytest

import conversations
import data
from tokenizer import MAX_TURNS


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data.build_dataset(d, 40, 4, 4, data.SceneConfig(image_size=32), seed=0)
    return data.load_split(d, "train")


def test_balance_statistics(split):
    traces = conversations.build_traces(split)
    assert all(t["tool"] == data.TOOL_FOR[t["kind"]] for t in traces)  # the flag decides the tool
    assert all(t["tool"] == "none" for t in conversations.build_traces(split, "none"))
    counts = collections.Counter(t["category"] for t in traces)
    balanced = conversations.balance_traces(traces, seed=1)
    stats = conversations.trace_stats(balanced)
    assert set(stats["category"].values()) == {min(counts.values())} and len(stats["category"]) == len(data.CATEGORIES)
    assert stats["traces"] == len(balanced) == len(data.CATEGORIES) * min(counts.values())
    assert len({id(t) for t in balanced}) == len(balanced)  # no trace twice
    front, left = stats["kind"]["relation_front"], stats["kind"]["relation_left"]
    have = collections.Counter(t["kind"] for t in traces)
    assert abs(front - left) <= 1 or min(front, left) == min(have["relation_front"], have["relation_left"])
    tools = collections.Counter(data.TOOL_FOR[k] for k, n in stats["kind"].items() for _ in range(n))
    assert stats["tool"] == dict(sorted(tools.items())) and stats["tool"]["none"] == stats["category"]["general"]
    assert max(stats["turns"]) <= MAX_TURNS and stats["turns"][1] == stats["tool"]["none"]
    three = conversations.balance_traces(traces, per_category=3)
    assert conversations.trace_stats(three)["category"] == {c: 3 for c in data.CATEGORIES}


def test_readings_quote_the_true_maps(split):
    names = [{data.name(o): o["id"] for o in s["objects"]} for s in split["scenes"]]
    checked = collections.Counter()
    agree = collections.defaultdict(list)
    for t, q in zip(conversations.build_traces(split), split["questions"]):
        reading = t["conversation"][-1]["content"][-2]["think"]
        depth, seg = split["depth"][t["scene"]], split["seg"][t["scene"]]
        if t["tool"] == "depth":
            # objects are quoted by name, or as "it" (relative distance's anchor)
            anchor = next(data.name(o) for o in split["scenes"][t["scene"]]["objects"] if o["id"] == q["objects"][0])
            quoted = {(who[4:] if who.startswith("the ") else anchor): float(v)
                      for who, v in re.findall(r"(the \w+ \w+|it) is at (\d+\.\d) m", reading)}
            if "options" in q:  # every option, in the question's order
                assert [n for n in quoted if n in q["options"]] == q["options"]
            for n, v in quoted.items():  # the median true depth inside the object's true mask
                assert v == pytest.approx(np.median(depth[seg == names[t["scene"]][n]]), abs=0.051)
                checked["depth"] += 1
            clause = re.search(r", (nearer|farther)\.$", reading)
            assert bool(clause) == (q["kind"] in ("depth_order", "relation_front"))
            if clause:  # the second object against the first, as the quoted numbers say
                first, second = [float(v) for v in re.findall(r"is at (\d+\.\d) m", reading)]
                assert first == second or (clause.group(1) == "nearer") == (second < first)
                checked["clause"] += 1
            if q["kind"] in ("depth_order", "relation_front"):
                nearer = min(q["options"], key=quoted.get)
                asks_nearer = "closer" in q["question"] or "in front" in q["question"]
                agree[q["kind"]].append((q["answer"] == data.answer_key(nearer, q["options"])) == asks_nearer)
        elif q["kind"] == "counting":
            n_seg, n = map(int, re.search(r"shows (\d+) segments; .* among them: (\d+)", reading).groups())
            assert n_seg == len([k for k in np.unique(seg) if k >= 2]) and n == int(q["answer"])
            checked["count"] += 1
        elif q["kind"] == "relation_left":  # the segments' columns, in the options' order
            cols = [int(c) for c in re.findall(r"segment at column (\d+)", reading)]
            left = q["options"][int(np.argmin(cols))]
            agree["left"].append((q["answer"] == data.answer_key(left, q["options"])) == ("left" in q["question"]))
    assert checked["depth"] > 100 and checked["count"] > 10 and checked["clause"] > 10
    for k, v in agree.items():  # map readings support the true answer (occlusion can shift a mask)
        assert len(v) >= 5 and np.mean(v) >= 0.85, (k, np.mean(v))
    for t in conversations.build_traces(split, "none"):  # the RE arm never quotes a map
        text = t["conversation"][-1]["content"][0]["think"]
        assert "map" not in text and not re.search(r"\d m\b", text)
