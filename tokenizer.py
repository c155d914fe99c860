"""
The text tokenizer and the one place that knows nanoCOOPER's token layout.

One shared vocabulary:  [text BPE ids][special ids][image code ids]
                         0 … n_text-1  n_text …     image_offset + code

- Text: a byte-level BPE trained here on the project's own text (questions, answers, instructions,
  the reflection prompt, reasoning). It is saved in tiktoken's rank format (one `base64 rank` line
  per token) and served by `tiktoken.Encoding`, which does the fast encoding.
- Special tokens are single ids. Plain text is encoded with `encode_ordinary`, so the string
  "<think>" typed by a user becomes ordinary bytes and can never forge a control token.
- Image code c of the VQ codebook has id image_offset + c; every image is exactly N codes between
  <|image|> and <|/image|>.

`render_conversation` turns a conversation into (ids, loss_mask); the mask is 1 on tokens the model
must learn to produce and 0 on everything the user or the sampler supplies (prompts, input images,
forced tokens). Conversations are JSON-able lists of messages:

    [{"role": "user", "content": [{"image": "rgb"}, {"text": "How many cubes are there?"}]},
     {"role": "assistant", "content": [{"think": "…"}, {"tool": "depth"}, {"image": "depth"},
                                       {"forced": REFLECTION_PROMPT}, {"think": "…"}, {"answer": "3"}]}]

Image parts name a key of the `images` dict passed to render (codes live in .npy files, not in JSON).

    python tokenizer.py            # train on the dataset's text, write the tokenizer file
"""
import base64
import collections
import os

import numpy as np
import regex
import tiktoken

import data
from conversations import DEPTH_INSTRUCTION, REFLECTION_PROMPT, SEG_INSTRUCTION, corpus_texts


SPECIAL_TOKENS = [
    "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|image|>", "<|/image|>",
    "<think>", "</think>", "<answer>", "</answer>",
    "<depth-estimation>", "</depth-estimation>", "<segmentation>", "</segmentation>",
]
# tool name -> (open tag, close tag, instruction)
TOOLS = {
    "depth": ("<depth-estimation>", "</depth-estimation>", DEPTH_INSTRUCTION),
    "seg": ("<segmentation>", "</segmentation>", SEG_INSTRUCTION),
}
MAX_TURNS = 3  # assistant turns per answer: at most 2 tool calls, then the answer

# GPT-style pre-split, but digits one at a time so numbers are spelled digit by digit: 3.25 and
# 32.5 share tokens, which is what lets a small model do numeric answers.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts, vocab_size):
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair.
    Returns tiktoken's mergeable_ranks {token bytes: rank}. Works on unique pre-split words with
    their counts, which is small for this project's templated text."""
    assert vocab_size >= 256
    counts = collections.Counter()
    for text in texts:
        counts.update(regex.findall(SPLIT_PATTERN, text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freqs = list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        pairs = collections.Counter()
        for w, f in zip(words, freqs):
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        if not pairs:
            break  # every word is a single token already
        # ties broken by the bytes themselves so training is deterministic
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        ranks[merged] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [merged]
                i += 1
    return ranks


class Tokenizer:
    def __init__(self, mergeable_ranks, codebook_size):
        self.n_text = len(mergeable_ranks)
        self.special_ids = {s: self.n_text + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanocooper", pat_str=SPLIT_PATTERN,
                                     mergeable_ranks=mergeable_ranks, special_tokens=self.special_ids)
        self.mergeable_ranks = mergeable_ranks
        self.image_offset = self.n_text + len(SPECIAL_TOKENS)
        self.codebook_size = codebook_size
        self.vocab_size = self.image_offset + codebook_size
        s = self.special_ids
        self.bos, self.eos, self.pad = s["<|bos|>"], s["<|eos|>"], s["<|pad|>"]
        self.user, self.assistant = s["<|user|>"], s["<|assistant|>"]
        self.image_start, self.image_end = s["<|image|>"], s["<|/image|>"]
        self.think, self.end_think = s["<think>"], s["</think>"]
        self.answer, self.end_answer = s["<answer>"], s["</answer>"]
        self.tool_open = {t: self.special_ids[o] for t, (o, c, _) in TOOLS.items()}
        self.tool_close = {t: self.special_ids[c] for t, (o, c, _) in TOOLS.items()}
        self.reflection_ids = self.encode(REFLECTION_PROMPT)

    # --- text ---------------------------------------------------------------------------------
    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Mixed ids to a readable string: text as text, specials by name, image codes as [img:c]."""
        out, text = [], []
        for i in ids:
            i = int(i)
            if i < self.n_text:
                text.append(i)
                continue
            if text:
                out.append(self.enc.decode(text))
                text = []
            out.append(SPECIAL_TOKENS[i - self.n_text] if i < self.image_offset else f"[img:{i - self.image_offset}]")
        if text:
            out.append(self.enc.decode(text))
        return "".join(out)

    # --- the layout ---------------------------------------------------------------------------
    def render_conversation(self, conversation, images=None, image_loss=True):
        """Conversation -> (ids, loss_mask), both lists of ints. `images` maps the names used in
        image parts to 1-D arrays of codes. `image_loss` supervises codes of images the assistant
        generates (stage 1 maps; stage 2 may switch it off). Forced tokens always get mask 0."""
        ids, mask = [self.bos], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for msg in conversation:
            role = msg["role"]
            if role not in ("user", "assistant"):
                raise ValueError(f"unknown role {role!r}")
            own = 1 if role == "assistant" else 0
            add([self.user if role == "user" else self.assistant], 0)
            after_tool = False
            for part in msg["content"]:
                (kind, value), = part.items()
                if kind == "text":
                    add(self.encode(value), own)
                elif kind == "think":
                    add([self.think] + self.encode(value) + [self.end_think], own)
                elif kind == "answer":
                    add([self.answer] + self.encode(value) + [self.end_answer], own)
                elif kind == "tool":
                    o, c, instruction = TOOLS[value]
                    add([self.special_ids[o]] + self.encode(instruction) + [self.special_ids[c]], own)
                elif kind == "forced":
                    add(self.encode(value), 0)
                elif kind == "image":
                    codes = np.asarray(images[value]).reshape(-1)
                    # after a tool call the sampler forces <|image|>; a direct image answer is the
                    # model's own choice. <|/image|> is always forced after exactly N codes.
                    add([self.image_start], own if not after_tool else 0)
                    add((codes.astype(np.int64) + self.image_offset).tolist(), own if image_loss else 0)
                    add([self.image_end], 0)
                else:
                    raise ValueError(f"unknown conversation part {kind!r}")
                after_tool = kind == "tool" and role == "assistant"
            if role == "assistant":
                add([self.eos], 1)
        return ids, mask

    def render_prompt(self, conversation, images=None):
        """The ids a sampler starts from: the conversation (ending with a user message), then
        <|assistant|>, so the model's first sampled token opens its reply."""
        ids, _ = self.render_conversation(conversation, images)
        return ids + [self.assistant]

    def parse_reply(self, ids):
        """The inverse of rendering an assistant reply: ids (what followed <|assistant|>) -> (parts,
        error). parts use the conversation format ({"think"}, {"tool"}, {"image": codes},
        {"forced"}, {"answer"}, {"text"}); error is None for a well-formed interleaved reply:
        zero or more turns of <think>…</think> plus a tool call with its map, then a final
        <think>…</think><answer>…</answer>, then <|eos|> and nothing else. The same parser serves
        trace building, the format reward and evaluation."""
        ids = [int(i) for i in ids]
        parts, i, error = [], 0, None
        closers = {self.think: ("think", self.end_think), self.answer: ("answer", self.end_answer)}
        closers.update({o: ("tool", self.tool_close[t]) for t, o in self.tool_open.items()})
        tool_of = {o: t for t, o in self.tool_open.items()}
        while i < len(ids) and ids[i] != self.eos:
            t = ids[i]
            if t in closers:
                kind, close = closers[t]
                j = ids.index(close, i + 1) if close in ids[i + 1:] else len(ids)
                inner = ids[i + 1:j]
                if j == len(ids) or any(x >= self.n_text for x in inner):
                    return parts, f"unclosed or malformed {kind}"
                parts.append({kind: tool_of[t] if kind == "tool" else self.enc.decode(inner)})
                i = j + 1
            elif t == self.image_start:
                j = i + 1
                while j < len(ids) and ids[j] >= self.image_offset:
                    j += 1
                if j == len(ids) or ids[j] != self.image_end:
                    return parts, "unterminated image"
                parts.append({"image": np.array(ids[i + 1:j]) - self.image_offset})
                i = j + 1
                r = self.reflection_ids
                if parts[-2:-1] and "tool" in parts[-2] and ids[i:i + len(r)] == r:
                    parts.append({"forced": REFLECTION_PROMPT})
                    i += len(r)
            elif t < self.n_text:
                j = i
                while j < len(ids) and ids[j] < self.n_text:
                    j += 1
                parts.append({"text": self.enc.decode(ids[i:j])})
                i = j
            else:
                return parts, f"unexpected token {self.decode([t])}"
        if i >= len(ids):
            error = "no <|eos|>"
        elif i != len(ids) - 1:
            error = "tokens after <|eos|>"
        return parts, error or self._interleaved_error(parts)

    @staticmethod
    def _interleaved_error(parts):
        """None if parts = (think, tool, image, forced)* think answer, with at most MAX_TURNS turns."""
        kinds = [next(iter(p)) for p in parts]
        turns = 0
        while kinds[:4] == ["think", "tool", "image", "forced"]:
            kinds, turns = kinds[4:], turns + 1
        if kinds != ["think", "answer"]:
            return "expected <think>…</think> then a tool call with its map, or <think>…</think><answer>…</answer>"
        if turns + 1 > MAX_TURNS:
            return f"{turns + 1} turns (at most {MAX_TURNS})"
        return None

    @staticmethod
    def answer_of(parts):
        """The text of the last <answer> part, or None."""
        answers = [p["answer"] for p in parts if "answer" in p]
        return answers[-1].strip() if answers else None

    # --- files --------------------------------------------------------------------------------
    def save(self, path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:  # tiktoken's rank format, as in its .tiktoken files
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, codebook_size):
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} not found: run `python tokenizer.py` first")
        ranks = {}
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{n}: malformed tokenizer line {line.strip()!r}")
        return cls(ranks, codebook_size)


def tokenizer_path(data_dir):
    """Where a data directory's BPE lives (tokenizer.py writes it, every stage reads it)."""
    return os.path.join(data_dir, "tokenizer.tiktoken")


def build_tokenizer(data_dir, vocab_size, codebook_size, path=None):
    path = path or tokenizer_path(data_dir)
    tok = Tokenizer(train_bpe(corpus_texts(data_dir), vocab_size), codebook_size)
    tok.save(path)
    return tok


if __name__ == "__main__":
    import json
    import time

    # -----------------------------------------------------------------------------
    data_dir = "data/tiny"
    vocab_size = 1024  # text ids only; specials and image codes come on top
    codebook_size = 512
    from configurator import configure
    configure(globals(), section="tokenizer")
    # -----------------------------------------------------------------------------
    t0 = time.time()
    data.prepare(data_dir)  # the dataset, built with the tiny preset if missing
    tok = build_tokenizer(data_dir, vocab_size, codebook_size)
    texts = corpus_texts(data_dir)
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    print(f"trained {tok.n_text} text tokens on {len(texts)} strings ({n_bytes} bytes) in {time.time() - t0:.1f}s")
    print(f"vocab: text 0..{tok.n_text - 1}, special {tok.n_text}..{tok.image_offset - 1}, "
          f"image {tok.image_offset}..{tok.vocab_size - 1}")
    print("example:", [tok.decode([i]) for i in tok.encode(texts[-1])])
    print("final: " + json.dumps({"n_text": tok.n_text, "vocab_size": tok.vocab_size,
                                  "bytes_per_token": round(n_bytes / n_tokens, 2)}))
