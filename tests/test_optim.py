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


def test_muon_orthogonalises_each_stacked_part_apart():
    """A matrix with muon_parts (the fused q|k|v projection, grouped-query or not) steps by each
    part's orthogonalised momentum, scaled for the whole matrix's shape; a plain matrix as one."""
    torch.manual_seed(0)
    for parts in ((16, 16, 16), (16, 4, 4)):
        w = torch.nn.Parameter(torch.randn(sum(parts), 16))
        w.muon_parts = parts
        plain = torch.nn.Parameter(w.detach().clone())
        g = torch.randn_like(w)
        w.grad, plain.grad = g.clone(), g.clone()
        before = w.detach().clone()
        optim.Muon([{"params": [w], "muon": True}, {"params": [plain], "muon": True}], lr=0.1, momentum=0.9).step()
        update = g + 0.9 * g  # Nesterov on a fresh momentum buffer
        scale = max(1.0, sum(parts) / 16) ** 0.5
        want = before - 0.1 * scale * torch.cat([optim.newton_schulz(u) for u in update.split(parts)])
        torch.testing.assert_close(w.detach(), want)
        torch.testing.assert_close(plain.detach(), before - 0.1 * scale * optim.newton_schulz(update))
