"""
The one sampler (COOPER §3.2): batched generation with a KV cache that knows the token
grammar. Eval, RL rollouts and the demos all call `generate`; there is no second copy of this loop.

The grammar, enforced by masking logits and by forcing tokens:
- after <|image|> exactly N = n_image_tokens image codes are sampled (only image ids allowed), then
  <|/image|> is forced; outside an image, image ids are never sampled;
- a tool call is <tool-open> instruction </tool-close>. The close tag makes the model draw the
  map into its own context: <|image|> is forced, N codes are sampled, <|/image|> and the reflection
  prompt are forced, and reasoning goes on;
- a turn ends with a tool call or the answer, at most MAX_TURNS turns: after MAX_TURNS-1 tool calls
  the tool-open tags are masked, so the row must answer. tools=False masks them from the start
  (the text-only RE arm);
- a row ends at <|eos|>, after max_new_tokens, or when it fills block_size.
Every returned token is marked sampled (1) or forced (0), so RL never trains on forced tokens.

The shape follows nanochat's engine.py: prefill once into a preallocated cache, then decode one
token per row per step, with a small state machine per row deciding what is forced and what may be
sampled. Rows of different lengths share the batch through the cache's per-row lengths, and a row
that finishes leaves the batch, so the rest decode without carrying it.
"""
import collections
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import KVCache
from tokenizer import MAX_TURNS, TOOLS

# What a row may sample next depends on where it is: one vocabulary mask per mode.
FREE, NO_TOOLS, IMAGE = 0, 1, 2  # reasoning (tool calls allowed / not), drawing an image
IN_TOOL = {name: 3 + i for i, name in enumerate(TOOLS)}  # inside <tool> … </tool>


def vocab_masks(tok, vocab_size):
    """(number of modes, vocab_size) bool, True where that mode may sample the id. vocab_size is
    the model's (it may pad past tok.vocab_size; those ids are never sampled)."""
    text = torch.zeros(vocab_size, dtype=torch.bool)
    text[:tok.image_offset] = True
    # never sampled: padding, a second <|bos|>, and <|/image|> (always forced after N codes)
    text[[tok.pad, tok.bos, tok.image_end]] = False
    opens, closes = list(tok.tool_open.values()), list(tok.tool_close.values())
    free = text.clone()
    free[closes] = False  # no close tag without an open call
    no_tools = free.clone()
    no_tools[opens] = False
    image = torch.zeros(vocab_size, dtype=torch.bool)
    image[tok.image_offset:tok.vocab_size] = True
    in_tool = []
    for name in IN_TOOL:
        m = torch.zeros(vocab_size, dtype=torch.bool)  # inside a call: plain-text instruction, then its own close tag
        m[:tok.n_text] = True
        m[tok.tool_close[name]] = True
        in_tool.append(m)
    return torch.stack([free, no_tools, image] + in_tool)


class RowState:
    """Where one row is in the grammar. `feed` sees every token the row gets, sampled or forced,
    and first the reply-so-far inside the prompt, so a prompt may end right after a tool's close
    tag or inside an image and the row carries on from there."""

    def __init__(self, tok, n_image_tokens):
        self.tok, self.n_image_tokens = tok, n_image_tokens
        self.tool_of = {i: name for name, i in tok.tool_open.items()}
        self.forced = collections.deque()  # tokens to force before sampling again
        self.image_left = 0  # codes still to sample in the open image
        self.reflect = False  # the open image is a tool's map: the reflection prompt follows it
        self.tool = None  # name of the open tool call
        self.tool_calls = 0
        self.last_tool = None  # name of the last tool called, in the prompt or the reply

    @property
    def drawing(self):
        """The tool whose map the open image is (None: no image open): no tool is called inside an
        image, so it is the last tool called before it."""
        return self.last_tool if self.image_left else None

    def mode(self, tools, max_turns):
        if self.image_left:
            return IMAGE
        if self.tool is not None:
            return IN_TOOL[self.tool]
        return FREE if tools and self.tool_calls < max_turns - 1 else NO_TOOLS

    def feed(self, t):
        tok = self.tok
        if self.forced:  # in a prompt that leaves the forced path, the prompt wins
            self.forced.popleft() if self.forced[0] == t else self.forced.clear()
        if self.image_left:
            self.image_left -= 1
            if not self.image_left:
                self.forced.append(tok.image_end)
                if self.reflect:
                    self.forced.extend(tok.reflection_ids)
                self.reflect = False
        elif t == tok.image_start:
            self.image_left = self.n_image_tokens
        elif t in self.tool_of:
            self.tool = self.last_tool = self.tool_of[t]
            self.tool_calls += 1
        elif t in tok.tool_close.values():
            self.tool = None
            self.forced.append(tok.image_start)
            self.reflect = True

    def replay(self, prompt):
        """Feed the prompt's part of the current reply (after its last <|assistant|>)."""
        start = max((i + 1 for i, t in enumerate(prompt) if t == self.tok.assistant), default=0)
        # a user turn may ask for a map (stage 1's request): the reply's image is that tool's map
        self.last_tool = next((self.tool_of[t] for t in reversed(prompt[:start]) if t in self.tool_of), None)
        for t in prompt[start:]:
            self.feed(t)


def sample_next(logits, temperature, top_k, top_p, generator):
    """One id per row from (B, V) logits (already masked with -inf)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely ids whose mass reaches top_p (the top id always)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@dataclass
class Generation:
    """The replies, one row per prompt, padded with tok.pad to the longest."""
    tokens: torch.Tensor  # (B, L) long: the new tokens after each prompt
    sampled_mask: torch.Tensor  # (B, L) long: 1 sampled by the model, 0 forced or padding
    logprobs: torch.Tensor  # (B, L) float: log p(token) of each sampled token, 0 elsewhere
    lengths: torch.Tensor  # (B,) long: new tokens per row

    def row(self, b):
        return self.tokens[b, :self.lengths[b]].tolist()


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, n_image_tokens, temperature=1.0, top_k=None,
             top_p=None, seed=None, generator=None, tools=True, max_turns=MAX_TURNS, image_temperature=None,
             share_prefill=True, rgb=None, seg_guidance=None):
    """Continue each prompt (a list of token ids; prompts may differ in length) by up to
    max_new_tokens tokens, all rows in one batch.

    temperature 0 is greedy; top_k / top_p restrict sampling after the grammar's masks.
    image_temperature, if given, is used for the codes of images instead: greedy decoding of a
    code grid picks each place's single likeliest code, and a small object's mass is spread over
    many codes, so a weak model's greedy maps come out as bare ground and sky (evaluation draws
    maps at 0.5: eval.DECODE).
    Randomness comes from `generator` if given, else a fresh torch.Generator seeded with `seed`, else torch's
    global generator. Returns a Generation. Its logprobs are the model's own log-probabilities at
    temperature 1 before any mask, i.e. exactly what model.token_logprobs gives for the same
    tokens, so RL can use them as the old policy's. A row's tokens include its final <|eos|>
    (sampled, so RL learns to stop). A row cut off by max_new_tokens or block_size may end
    mid-image or mid-reply. The model's mode is left alone: call model.eval() first if it has
    dropout. share_prefill=False prefills every row on its own: the same samples, more compute
    (the reference the tests and bench.py rl compare the shared prefill to). rgb, uint8
    (B, H, W, 3), is each prompt's question image as pixels, for a model that reads them
    (model.py, "Image reader"; the prefill reads them, as it reads the image's codes).
    seg_guidance > 0 (None: the model's config.seg_guidance; needs a seg head) draws each code of a
    seg map from the logits plus that many times the seg head's log-probabilities at the same place
    of the row's first image (a product of experts): drawing alone, the model copies its own
    earlier codes and one wrong code travels, while the head reads each place from the photo
    (losses.py, "Place heads"). The logprobs stay the model's own.
    """
    assert n_image_tokens >= 1 and max_new_tokens >= 1
    device = next(model.parameters()).device
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token (e.g. <|bos|>)")
    if max(lengths) > block_size:
        raise ValueError(f"prompt of length {max(lengths)} is longer than block_size {block_size}")
    B, max_len = len(prompts), min(block_size, max(lengths) + max_new_tokens)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    # Prefill each distinct prompt once (RL samples a group of G replies to one prompt), right-
    # padded: causality keeps the padding out of the real tokens, and decoding overwrites it.
    # Then fan each prefilled row out to the rows that continue it.
    keys = [tuple(p) if share_prefill else b for b, p in enumerate(prompts)]
    first, lead = {}, {}
    source = torch.tensor([first.setdefault(key, len(first)) for key in keys])  # each row's prefilled row
    for b, key in enumerate(keys):
        lead.setdefault(key, b)  # the first row of each key, in the order of `first`
    distinct = [prompts[b] for b in lead.values()]
    x = torch.full((len(distinct), max(lengths)), tok.pad, dtype=torch.long)
    for i, p in enumerate(distinct):
        x[i, :len(p)] = torch.tensor(p)
    seg_guidance = model.config.seg_guidance if seg_guidance is None else seg_guidance
    cache = KVCache(model.config, len(distinct), max_len, keep_seg=seg_guidance > 0)
    pixels = None if rgb is None else torch.as_tensor(rgb)[list(lead.values())].to(device)
    logits, _ = model(x.to(device), kv_cache=cache, rgb=pixels)
    prompt_len = torch.tensor([len(p) for p in distinct])
    logits = logits[torch.arange(len(distinct)), prompt_len - 1][source.to(device)]  # (B, V)
    cache.lengths = prompt_len.to(device)
    if len(distinct) < B:
        cache.select_rows(source)

    masks = vocab_masks(tok, vocab_size).to(device)
    rows = [RowState(tok, n_image_tokens) for _ in range(B)]
    for row, p in zip(rows, prompts):
        row.replay(p)
    running = list(range(B))  # the batch row of each cache row: a finished row leaves the cache
    columns, sampled_columns, logprob_columns = [], [], []
    for step in range(max_new_tokens):
        mode = torch.tensor([rows[b].mode(tools, max_turns) for b in running], device=device)
        masked = logits.float().masked_fill(~masks[mode], float("-inf"))
        if cache.seg is not None:
            guided = [(j, n_image_tokens - rows[b].image_left) for j, b in enumerate(running)
                      if rows[b].drawing == "seg"]
            if guided:
                at, place = torch.tensor(guided, device=device).T
                masked[at, tok.image_offset:tok.image_offset + model.config.seg_codes] += seg_guidance * cache.seg[at, place]
        next_ids = sample_next(masked, temperature, top_k, top_p, generator)
        drawing = mode == IMAGE
        if image_temperature is not None and image_temperature != temperature and drawing.any():
            next_ids = torch.where(drawing, sample_next(masked, image_temperature, top_k, top_p, generator), next_ids)
        logprob = torch.zeros(B, device=device)
        logprob[running] = F.log_softmax(logits.float(), dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        column, sampled, still = [tok.pad] * B, [0] * B, []
        for j, (b, t) in enumerate(zip(running, next_ids.tolist())):
            row = rows[b]
            if row.forced:
                t = row.forced[0]
            else:
                sampled[b] = 1
            column[b] = t
            row.feed(t)
            # the row's next token would sit at position length + step + 1: stop when that is full
            if t != tok.eos and lengths[b] + step + 1 < max_len:
                still.append(j)
        sampled = torch.tensor(sampled, device=device)
        columns.append(column)
        sampled_columns.append(sampled)
        logprob_columns.append(logprob * sampled)
        if not still or step == max_new_tokens - 1:
            break
        if len(still) < len(running):  # drop finished rows: every step costs in proportion to the rows in it
            cache.select_rows(torch.tensor(still))
            running = [running[j] for j in still]
        logits, _ = model(torch.tensor([column[b] for b in running], device=device)[:, None], kv_cache=cache)
        logits = logits[:, -1]
        cache.lengths += 1

    tokens = torch.tensor(columns, device=device).T
    live = tokens != tok.pad
    # a row's tokens are the prefix up to where it finished; pad is never sampled or forced
    new_lengths = live.long().cumprod(dim=1).sum(dim=1)
    return Generation(tokens=tokens, sampled_mask=torch.stack(sampled_columns, dim=1),
                      logprobs=torch.stack(logprob_columns, dim=1), lengths=new_lengths)
