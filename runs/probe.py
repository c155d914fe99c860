"""
What every probe of a trained model in runs/ starts from: the command line (the checkpoint, the
data and VQ tokenizer it was trained on; each probe adds its own options) and the loaded model,
tokenizer, codes, questions and val pictures (for a model that reads them). One thread unless
OMP_NUM_THREADS says otherwise, so a probe can run beside a training run. A module the probes import, not a script.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import prepare  # noqa: E402
import trainer  # noqa: E402

CKPT_HELP = "a model trained on data_dir's scenes (bench.py learn writes out_dir/rgb/ckpt.pt)"


def parser(doc, ckpt_help=CKPT_HELP):
    """A probe's argument parser: its docstring's second paragraph as the description, the
    checkpoint, --data_dir and --vq_ckpt."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help=ckpt_help)
    p.add_argument("--data_dir", default="data/learn")
    p.add_argument("--vq_ckpt", default="out/vqgan_learn/ckpt.pt")  # bench.py learn's
    return p


def load(args):
    """(model in eval mode, tokenizer, codes by split, questions by split, the val split's pictures)
    for parser()'s args."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, _ = trainer.load_model(args.ckpt)
    tok, _, codes, questions, _ = prepare.stage_data(args.data_dir, args.vq_ckpt)
    return model, tok, codes, questions, data.load_split(args.data_dir, "val")["rgb"]
