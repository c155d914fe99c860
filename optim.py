"""
Muon, the optimizer the models here train with (model.GPT.configure_optimizers builds it): for a
weight matrix, take the momentum of its gradient and replace it by the nearest semi-orthogonal
matrix (all singular values ~1), found by a few Newton-Schulz iterations (Keller Jordan;
modded-nanogpt, nanochat). Adam's step follows the gradient's large directions; a circuit that must
grow out of a tiny signal (a head that finds the object a question names) sits in the small ones,
and orthogonalising lifts them to the same size. On this project's lookup probes that shortened the
plateau several-fold (docs/experiments.md). Embeddings, the head and the norm gains keep AdamW, in
the same optimizer.
"""
import torch


def newton_schulz(g, steps=5):
    """An approximately semi-orthogonal matrix with g's singular vectors (singular values in about
    [0.7, 1.2]): the quintic iteration tuned for speed over exactness. g is one matrix (m, n) or a
    stack of them (k, m, n), each orthogonalised on its own: the matrices here are small, and one
    batched call for a stack keeps two cores busy where a call a matrix does not (docs/experiments.md)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float().reshape(-1, *g.shape[-2:])
    x = x / (x.norm(dim=(1, 2), keepdim=True) + 1e-7)
    wide = x.size(1) <= x.size(2)
    x = x if wide else x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)  # a·x + (b·s + c·s·s)·x
    return (x if wide else x.mT).reshape(g.shape).to(g.dtype)


def split_parts(p, t):
    """t (p's shape) split into the parts Muon orthogonalises apart: p's `muon_parts` rows (the
    fused q|k|v projection), or the whole matrix."""
    return t.split(getattr(p, "muon_parts", (p.size(0),)))


class Muon:
    """Muon for the groups marked muon=True, AdamW for the others (with no Muon group it is AdamW),
    in one optimizer so the loop, the schedule (group["lr"] = lr x lr_scale) and checkpoints treat
    it like any other. A matrix that stacks several (the fused q|k|v projection) says so with a
    `muon_parts` attribute, its row counts, and each part is orthogonalised apart; an m x n matrix's
    update is scaled by sqrt(max(1, m/n)) so tall and square matrices take steps of the same RMS.
    No weight decay on Muon's matrices.

    Not a torch.optim.Optimizer: building one of those imports torch._dynamo, 1.5-2 s of every
    script's start on a CPU (docs/experiments.md). This has what the training loop uses:
    param_groups, step, zero_grad, and state_dict / load_state_dict in torch's format."""

    def __init__(self, params, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        defaults = dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, muon=False, lr_scale=1.0)
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in params]
        self.state = {}  # parameter -> its momentum (Muon) or its moments and step count (AdamW)

    def parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            p.grad = None

    def state_dict(self):
        """Parameters by their place in the groups, as torch's optimizers save them."""
        index = {p: i for i, p in enumerate(self.parameters())}
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": [dict(g, params=[index[p] for p in g["params"]]) for g in self.param_groups]}

    def load_state_dict(self, state_dict):
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved state's parameter groups differ from this optimizer's")
        params = self.parameters()
        self.state = {params[i]: {k: v.to(params[i].device) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state_dict["state"].items()}
        for group, g in zip(self.param_groups, saved):
            group.update({k: v for k, v in g.items() if k != "params"})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
                continue
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {})
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                beta1, beta2 = group["betas"]
                state["step"] += 1
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))

    def _muon_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        parts = []  # every matrix's momentum (Nesterov), split into its parts
        for p in params:
            buf = self.state.setdefault(p, {}).setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(group["momentum"]).add_(p.grad)
            parts.append(split_parts(p, p.grad.add(buf, alpha=group["momentum"])))
        by_shape = {}  # the parts of one shape orthogonalised in one batched call, handed back in order
        for u in (u for us in parts for u in us):
            by_shape.setdefault(u.shape, []).append(u)
        done = {shape: iter(newton_schulz(torch.stack(us))) for shape, us in by_shape.items()}
        for p, us in zip(params, parts):
            update = torch.cat([next(done[u.shape]) for u in us])
            p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
