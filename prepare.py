"""
Preparation, in one place: what every entry point calls before it trains or evaluates. Each step
builds its output only when it is missing, in the order the pipeline runs them,

    dataset (data.py) -> text BPE (tokenizer.py) -> VQ tokenizer (vqgan.py) -> codes of every split

so `python train_stage1.py` on a fresh checkout just works: it builds what it lacks with the tiny
preset's data and vqgan.py's defaults (a longer VQ than the preset's) and says so. runs/tiny_cpu.sh
runs data.py, tokenizer.py and vqgan.py itself first, with the preset's settings, and then every
step here finds its output in place. Loaders (data.load_split, Tokenizer.load, vqgan.load_vqgan,
vqgan.load_codes) only load; they build nothing and say what to run when a file is missing.
"""
import json
import os
import time

import numpy as np

import data
import tokenizer
import vqgan

BPE_VOCAB = 1024  # text ids of a tokenizer built here (tokenizer.py's default)


def codes_fresh(data_dir, split, sha):
    """Whether a split's codes exist and came from the checkpoint whose sha256 is sha."""
    meta_path = os.path.join(data_dir, split, "codes.json")
    return os.path.exists(vqgan.codes_path(data_dir, split)) and os.path.exists(meta_path) \
        and json.load(open(meta_path)).get("checkpoint_sha256") == sha


def ensure_codes(data_dir, ckpt_path):
    """Encode every split whose codes are missing or came from another checkpoint.
    Returns {split: path of codes.npy}."""
    model, sha, paths = None, vqgan.sha256(ckpt_path), {}
    for split in data.SPLITS:
        if not codes_fresh(data_dir, split, sha):
            model = model or vqgan.load_vqgan(ckpt_path)
            t0 = time.time()
            paths[split] = vqgan.encode_split(model, data_dir, split, ckpt_path)
            print(f"encoded {split} with {ckpt_path} -> {paths[split]} ({time.time() - t0:.1f}s)")
        else:
            paths[split] = vqgan.codes_path(data_dir, split)
    return paths


def prepare(data_dir="data/tiny", vq_ckpt="out/vqgan/ckpt.pt"):
    """Build whatever of dataset, BPE, VQ and codes is missing (the tiny preset's data, vqgan.py's defaults)."""
    size = data.prepare(data_dir)["config"]["image_size"]
    tok_path = tokenizer.tokenizer_path(data_dir)
    if not os.path.exists(tok_path):
        print(f"no tokenizer at {tok_path}: training one (python tokenizer.py)")
        tokenizer.build_tokenizer(data_dir, BPE_VOCAB, vqgan.VQConfig().codebook_size)
    if not os.path.exists(vq_ckpt):
        if os.path.basename(vq_ckpt) != "ckpt.pt":
            raise SystemExit(f"no VQ checkpoint at {vq_ckpt}: vqgan.py writes <out_dir>/ckpt.pt, so name one of those")
        print(f"no VQ tokenizer at {vq_ckpt}: training one at vqgan.py's defaults (python vqgan.py)")
        vqgan.train(vqgan.TrainConfig(data_dir=data_dir, out_dir=os.path.dirname(vq_ckpt)), vqgan.VQConfig(image_size=size))
    ensure_codes(data_dir, vq_ckpt)


def stage_data(data_dir, vq_ckpt, splits=("train", "val")):
    """What every transformer stage starts from, built first if missing: (tokenizer, VQ, codes and
    questions by split, refs: the paths a checkpoint records)."""
    prepare(data_dir, vq_ckpt)
    vq = vqgan.load_vqgan(vq_ckpt)
    tok_path = tokenizer.tokenizer_path(data_dir)
    tok = tokenizer.Tokenizer.load(tok_path, vq.cfg.codebook_size)
    codes = {s: vqgan.load_codes(data_dir, s).astype(np.int64) for s in splits}
    questions = {s: data.load_questions(data_dir, s) for s in splits}
    refs = {"tokenizer": tok_path, "vq": vq_ckpt, "data_dir": data_dir}
    return tok, vq, codes, questions, refs


def code_patches(data_dir, vq, train_codes):
    """Each code's mean pixel patch over the train split's three pseudo-images (vqgan.code_patches),
    for a model from scratch with code_patches=True."""
    _, images = vqgan.load_pseudo_images(data_dir, "train", vq.depth_encoding)
    return vqgan.code_patches(train_codes, images, vq.cfg.codebook_size)
