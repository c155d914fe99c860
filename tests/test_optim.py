"""optim.py: Muon's orthogonalisation (its AdamW half is held to torch's AdamW in test_model.py,
on a model)."""
import torch

import optim


def test_newton_schulz_gives_singular_values_near_one():
    torch.manual_seed(0)
    g = torch.randn(96, 32) @ torch.diag(torch.logspace(-2, 0, 32))  # singular values spread over ~100x
    for m in (g, g.T):
        s = torch.linalg.svdvals(optim.newton_schulz(m))
        assert s.min() > 0.5 and s.max() < 1.3, s
