"""tokenizer.py: BPE round trips, special tokens, vocabulary layout and rendered loss masks."""
import numpy as np
import pytest

import conversations
import data
import tokenizer
from tokenizer import REFLECTION_PROMPT, SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data.build_dataset(d, 40, 8, 8, data.SceneConfig(image_size=32), seed=0)
    return d


@pytest.fixture(scope="module")
def tok(corpus):
    return tokenizer.build_tokenizer(corpus, vocab_size=400, codebook_size=64)


def test_round_trip_on_all_dataset_text(tok, corpus):
    texts = conversations.corpus_texts(corpus)
    for split in data.SPLITS:  # val/test text was not trained on: still exact
        texts += conversations.text_corpus(corpus, split)
    texts += ["héllo wörld ✓ 3.25 m", "", "  two  spaces\n"]
    n_bytes = n_tok = 0
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert all(0 <= i < tok.n_text for i in ids)
        n_bytes, n_tok = n_bytes + len(t.encode()), n_tok + len(ids)
    assert n_bytes / n_tok > 2.5  # merges learned from the corpus actually compress it


def test_specials_are_single_ids_never_made_from_text(tok):
    for s in SPECIAL_TOKENS:
        i = tok.special_ids[s]
        assert tok.n_text <= i < tok.image_offset and tok.decode([i]) == s
        assert all(j < tok.n_text for j in tok.encode(f"a {s} b{s}"))  # typed text stays text
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)


def test_image_ids_above_everything(tok):
    assert tok.image_offset == tok.n_text + len(SPECIAL_TOKENS)
    assert tok.vocab_size == tok.image_offset + 64
    assert tok.decode([tok.image_offset + 5]) == "[img:5]"


def test_digits_are_single_tokens(tok):
    ids = tok.encode("3.25 m")
    assert [tok.decode([i]) for i in ids][:4] == ["3", ".", "2", "5"]


def test_save_load_round_trip(tok, tmp_path):
    p = str(tmp_path / "t.tiktoken")
    tok.save(p)
    tok2 = Tokenizer.load(p, codebook_size=64)
    text = "Which is closer to the camera, the red cube or the blue sphere?"
    assert tok2.encode(text) == tok.encode(text) and tok2.image_offset == tok.image_offset
    with pytest.raises(FileNotFoundError, match="python tokenizer.py"):
        Tokenizer.load(str(tmp_path / "missing"), 64)
    (tmp_path / "bad").write_text("QQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad:2"):
        Tokenizer.load(str(tmp_path / "bad"), 64)


def test_bpe_training_is_deterministic():
    texts = ["the red cube", "the red sphere", "the blue cube"] * 5
    assert tokenizer.train_bpe(texts, 280) == tokenizer.train_bpe(list(texts), 280)


def test_render_conversation_masks(tok):
    rgb, depth = np.arange(6), np.arange(6)[::-1]
    conv = [
        {"role": "user", "content": [{"image": "rgb"}, {"text": "How far is the red cube from the camera, in meters?"}]},
        {"role": "assistant", "content": [{"think": "Depth will help."}, {"tool": "depth"}, {"image": "depth"},
                                          {"forced": REFLECTION_PROMPT}, {"think": "It reads 3.1 m."}, {"answer": "3.1 m"}]},
    ]
    ids, mask = tok.render_conversation(conv, {"rgb": rgb, "depth": depth})
    assert len(ids) == len(mask)
    ids, mask = np.array(ids), np.array(mask)
    a = int(np.nonzero(ids == tok.assistant)[0][0])
    assert ids[0] == tok.bos and (mask[:a + 1] == 0).all()  # the prompt is never supervised
    starts = np.nonzero(ids == tok.image_start)[0]
    ends = np.nonzero(ids == tok.image_end)[0]
    assert len(starts) == len(ends) == 2 and (ends - starts == 7).all()  # exactly N codes between
    assert (ids[starts[0] + 1:ends[0]] - tok.image_offset == rgb).all()
    assert (ids[starts[1] + 1:ends[1]] - tok.image_offset == depth).all()
    # after the tool call the sampler forces <|image|> and <|/image|>; the codes are generated
    assert mask[starts[1]] == 0 and mask[ends[1]] == 0 and (mask[starts[1] + 1:ends[1]] == 1).all()
    refl = tok.encode(REFLECTION_PROMPT)
    r0 = ends[1] + 1
    assert list(ids[r0:r0 + len(refl)]) == refl and (mask[r0:r0 + len(refl)] == 0).all()
    assert ids[-1] == tok.eos and mask[-1] == 1
    assert mask[a + 1] == 1 and ids[a + 1] == tok.think
    # image_loss=False keeps the generated codes out of the loss, nothing else changes
    _, mask2 = tok.render_conversation(conv, {"rgb": rgb, "depth": depth}, image_loss=False)
    assert (np.array(mask2)[starts[1] + 1:ends[1]] == 0).all()
    assert np.array(mask2).sum() == mask.sum() - 6


def test_direct_image_answer_supervises_its_opening(tok):
    conv = [{"role": "user", "content": [{"image": "rgb"}, {"tool": "seg"}]},
            {"role": "assistant", "content": [{"image": "seg"}]}]
    ids, mask = tok.render_conversation(conv, {"rgb": np.zeros(4, int), "seg": np.ones(4, int)})
    start = len(ids) - 7  # <|image|> c c c c <|/image|> <|eos|>
    assert ids[start] == tok.image_start and mask[start:] == [1, 1, 1, 1, 1, 0, 1]
    assert sum(mask[:start]) == 0
    prompt = tok.render_prompt(conv[:1], {"rgb": np.zeros(4, int)})
    assert prompt == ids[:start] and prompt[-1] == tok.assistant


def test_render_rejects_unknown_parts(tok):
    with pytest.raises(ValueError, match="unknown conversation part"):
        tok.render_conversation([{"role": "user", "content": [{"video": "x"}]}])
    with pytest.raises(ValueError, match="unknown role"):
        tok.render_conversation([{"role": "system", "content": []}])


def interleaved(tok, n_tools=1, n=5):
    content = []
    for k in range(n_tools):
        content += [{"think": f"Step {k}."}, {"tool": ["depth", "seg"][k % 2]}, {"image": "m"}, {"forced": REFLECTION_PROMPT}]
    content += [{"think": "So it is 2 m."}, {"answer": "2.0 m"}]
    conv = [{"role": "user", "content": [{"image": "m"}, {"text": "q?"}]}, {"role": "assistant", "content": content}]
    ids, _ = tok.render_conversation(conv, {"m": np.arange(n)})
    a = ids.index(tok.assistant)
    return ids[a + 1:], content


@pytest.mark.parametrize("n_tools", [0, 1, 2])
def test_parse_reply_inverts_rendering(tok, n_tools):
    reply, content = interleaved(tok, n_tools)
    parts, error = tok.parse_reply(reply)
    assert error is None
    assert [next(iter(p)) for p in parts] == [next(iter(c)) for c in content]
    assert all((p["image"] == np.arange(5)).all() for p in parts if "image" in p)
    assert tok.answer_of(parts) == "2.0 m"


def test_parse_reply_rejects_malformed(tok):
    reply, _ = interleaved(tok, 1)
    assert tok.parse_reply(reply[:-1])[1] == "no <|eos|>"
    assert tok.parse_reply(reply + tok.encode("x"))[1] == "tokens after <|eos|>"
    assert tok.parse_reply(reply[:-1] + tok.encode(" more") + [tok.eos])[1].startswith("expected")
    three, _ = interleaved(tok, 3)
    assert tok.parse_reply(three)[1] == "4 turns (at most 3)"
    no_think = [tok.answer] + tok.encode("3") + [tok.end_answer, tok.eos]
    parts, err = tok.parse_reply(no_think)
    assert err.startswith("expected") and tok.answer_of(parts) == "3"  # a direct answer parses, but is not interleaved
    assert tok.parse_reply([tok.think] + tok.encode("hm") + [tok.eos])[1] == "unclosed or malformed think"
    i = reply.index(tok.image_start)
    assert tok.parse_reply(reply[:i + 3] + [tok.eos])[1] == "unterminated image"
