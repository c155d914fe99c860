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


def test_newton_schulz_on_a_stack_equals_each_matrix_alone():
    """Muon orthogonalises the parts of one shape in one batched call: each must come out as it
    would alone (to rounding), wide or tall, and the reference form a·x + (b·s + c·s²)·x holds."""
    torch.manual_seed(0)
    for shape in ((3, 16, 40), (3, 40, 16), (1, 8, 8)):
        g = torch.randn(shape)
        stacked = optim.newton_schulz(g)
        for k in range(shape[0]):
            torch.testing.assert_close(stacked[k], optim.newton_schulz(g[k]))
            x = g[k] / g[k].norm()
            x = x if shape[1] <= shape[2] else x.T
            for _ in range(5):
                s = x @ x.T
                x = 3.4445 * x + (-4.7750 * s + 2.0315 * s @ s) @ x
            torch.testing.assert_close(stacked[k], x if shape[1] <= shape[2] else x.T, atol=1e-5, rtol=1e-4)


def test_muon_orthogonalises_each_stacked_part_apart():
    """A matrix with muon_parts (the fused q|k|v projection, grouped-query or not) steps by each
    part's orthogonalised momentum, scaled for the whole matrix's shape; a plain matrix as one; and
    matrices whose parts share a shape (orthogonalised in one batched call) each by its own."""
    torch.manual_seed(0)
    for parts in ((16, 16, 16), (16, 4, 4)):
        w = torch.nn.Parameter(torch.randn(sum(parts), 16))
        w.muon_parts = parts
        plain = torch.nn.Parameter(w.detach().clone())
        twin = torch.nn.Parameter(torch.randn_like(w))  # the same shape and parts as w, its own gradient
        twin.muon_parts = parts
        g, g_twin = torch.randn_like(w), torch.randn_like(w)
        w.grad, plain.grad, twin.grad = g.clone(), g.clone(), g_twin.clone()
        before, twin_before = w.detach().clone(), twin.detach().clone()
        optim.Muon([{"params": [w, twin], "muon": True}, {"params": [plain], "muon": True}], lr=0.1, momentum=0.9).step()
        scale = max(1.0, sum(parts) / 16) ** 0.5
        for p, start, grad in ((w, before, g), (twin, twin_before, g_twin)):
            update = grad + 0.9 * grad  # Nesterov on a fresh momentum buffer
            want = start - 0.1 * scale * torch.cat([optim.newton_schulz(u) for u in update.split(parts)])
            torch.testing.assert_close(p.detach(), want)
        torch.testing.assert_close(plain.detach(), before - 0.1 * scale * optim.newton_schulz(g + 0.9 * g))


def test_state_dict_round_trip_continues_exactly_and_refuses_other_groups():
    """An optimizer loaded from another's state_dict takes the same next steps; a state with
    other parameter groups (another optimizer setting) is refused with ValueError."""
    torch.manual_seed(0)
    w0, b0 = torch.randn(8, 4), torch.randn(4)
    grads = [(torch.randn(8, 4), torch.randn(4)) for _ in range(4)]

    def run(steps, opt_from=None):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        opt = optim.Muon([{"params": [w], "muon": True}, {"params": [b], "weight_decay": 0.1}], lr=0.05)
        if opt_from is not None:
            opt.load_state_dict(opt_from[0].state_dict())
            with torch.no_grad():
                w.copy_(opt_from[1]), b.copy_(opt_from[2])
        for gw, gb in steps:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
            opt.zero_grad()
            assert w.grad is None
        return opt, w.detach(), b.detach()

    _, w_all, b_all = run(grads)
    half = run(grads[:2])
    _, w_resumed, b_resumed = run(grads[2:], opt_from=half)
    assert torch.equal(w_all, w_resumed) and torch.equal(b_all, b_resumed)
    other = optim.Muon([{"params": [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]}], lr=0.05)
    try:
        other.load_state_dict(half[0].state_dict())
    except ValueError:
        pass
    else:
        raise AssertionError("a state of other groups was loaded")
