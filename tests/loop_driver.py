"""A tiny run of trainer.train on synthetic token sequences, for the loop's tests (DDP, resume).
    python tests/loop_driver.py OUT_DIR MAX_ITERS GRAD_ACCUM [INIT_FROM [OPTIMIZER [OBJECT_HEAD]]]
    torchrun --standalone --nproc_per_node=2 tests/loop_driver.py ..."""
import os
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trainer  # noqa: E402

VOCAB, T = 64, 24
TOK = types.SimpleNamespace(vocab_size=VOCAB, image_offset=VOCAB, codebook_size=0)  # text only: no image codes
# sequences that repeat a random 4-token motif: learnable, so the loss moves
_rng = np.random.default_rng(0)
CORPUS = torch.tensor(np.tile(_rng.integers(0, VOCAB, (256, 4)), (1, T // 4 + 1))[:, :T + 1])


# every key the training loop reads, as a stage script sets them at its top
LOOP = dict(out_dir="out/run", init_from="scratch", seed=1337, device="auto", compile=False,
            n_layer=4, n_head=4, n_embd=256, block_size=512, dropout=0.0, attn_impl="auto", grid_rope=True, grid_prior=6.0,
            max_iters=500, batch_size=16, grad_accum=1,
            learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, optimizer="adamw", muon_lr=0.02,
            log_interval=10, eval_interval=100, eval_iters=10, peak_tflops=0.0)


def get_batch(split, rng, batch_size=4):
    rows = torch.from_numpy(rng.integers(0, len(CORPUS), batch_size))
    seq = CORPUS[rows]
    mask = torch.ones(batch_size, T, dtype=torch.long)
    mask[:, :3] = 0  # the first tokens of a motif cannot be predicted
    return seq[:, :-1], seq[:, 1:], mask


def config(out_dir, max_iters, grad_accum, init_from="scratch", optimizer="adamw", object_head=False):
    """object_head=True gives the model a head these text batches never train, as a stage-1
    checkpoint brings to stage 2 and RL."""
    return dict(LOOP, out_dir=out_dir, max_iters=max_iters, grad_accum=grad_accum, init_from=init_from, optimizer=optimizer,
                object_head=object_head,
                n_layer=2, n_head=2, n_embd=32, block_size=T, batch_size=4, warmup_iters=2, learning_rate=3e-3,
                log_interval=1, eval_interval=max(1, max_iters // 2), eval_iters=2, peak_tflops=1.0, attn_impl="sdpa")


def main(out_dir, max_iters, grad_accum, init_from="scratch", optimizer="adamw", object_head="False"):
    torch.manual_seed(0)
    cfg = config(out_dir, int(max_iters), int(grad_accum), init_from, optimizer, object_head in (True, "True"))
    run = trainer.setup_run("cpu")
    model, opt, start = trainer.init_model(cfg, run, TOK, 0)
    trainer.train(cfg, run, model, opt, start, get_batch)
    if run.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
