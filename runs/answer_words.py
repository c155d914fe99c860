"""
Which word of an answer does a model get wrong? For each kind of val question, teacher-forced (the
true answer in context, as eval.direct_scores scores), the share of questions whose answer is
right at every token, and the share right at each of the answer's words in turn: <answer>, then
its text's tokens, then </answer> and <|eos|> (each over the answers that have that word). A multiple-choice answer named in full ("red cube")
showed its first word right 0.95 of the time and its second, copied from the question, 0.6: the
reason answers are now data.answer_key's one word. For a choice, also the share whose first word
is the first word of another option (the wrong object named) rather than of none.

    python runs/answer_words.py out/learn/rgb/ckpt.pt --data_dir=data/learn --kinds depth_order relation_left

Ends with `final: {json}`.
"""
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batches  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)

parser = probe.parser(__doc__)
parser.add_argument("--kinds", nargs="+", default=["depth_order", "relation_left", "relation_front", "relative_distance", "general"])
parser.add_argument("--n", type=int, default=300, help="val questions a kind")
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
result = {"ckpt": args.ckpt}
for kind in args.kinds:
    asked = [q for q in questions["val"] if q["kind"] == kind][:args.n]
    if not asked:
        continue
    count, seen = collections.Counter(), collections.Counter()  # right, and asked (a word only some answers have)
    with torch.no_grad():
        for i in range(0, len(asked), 32):
            chunk = asked[i:i + 32]
            rows = batches.vqa_rows(tok, chunk, codes["val"])
            x, y, m = batches.make_batch(tok, rows, model.config.block_size)
            guess = model(x, rgb=batches.scene_pictures(rgb, chunk))[0].argmax(-1)
            for r, q in enumerate(chunk):
                at = (m[r] == 1).nonzero().flatten()
                right = (guess[r, at] == y[r, at]).tolist()
                count["all"] += all(right)
                seen["all"] += 1
                names = {tok.answer: "<answer>", tok.end_answer: "</answer>", tok.eos: "<|eos|>"}
                for j, (ok, t) in enumerate(zip(right, y[r, at].tolist())):
                    count[names.get(t, f"word {j}")] += ok
                    seen[names.get(t, f"word {j}")] += 1
                if "options" in q:  # the first word is another option's (the wrong object named)
                    first = tok.encode(q["answer"])[0]
                    others = {tok.encode(c)[0] for c in q["choices"]} - {first}
                    count["other option"] += int(guess[r, at[1]]) in others
                    seen["other option"] += 1
    row = {k: round(count[k] / n, 3) for k, n in seen.items()}
    print(f"{kind} ({len(asked)}): " + ", ".join(f"{k} {v:.3f}" + (f" (of {seen[k]})" if seen[k] < len(asked) else "")
                                                 for k, v in row.items()))
    result[kind] = row
print("final: " + json.dumps(result))
