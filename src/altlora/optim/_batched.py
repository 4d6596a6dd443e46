"""Batched building blocks shared by the baseline optimizers (LoRA+, ScaledGD, LoRA-RITE, LoRA-Pro).

All functions work on a *bucket* of equal-shape pairs stacked along dim 0 (``n`` pairs), so a
step is a handful of batched kernels whatever the number of pairs:

* ``stack_factor`` / ``stack_grad`` / ``write_factor``: rank-first views in and out
  (``A -> (r, d)``, ``B -> B^T (r, k)``, see :func:`~altlora.optim.paired.r_first`). FSDP2
  factors (``DTensor`` shards) are gathered whole, every rank computes the same update, and
  each keeps its own shard of the result: exact, at the cost of gathering A, B and their
  gradients (small) and of keeping the optimizer state unsharded;
* ``psd_pinv_solve``: ``G^+ R`` for symmetric PSD ``G`` through one batched ``eigh``
  (a pseudo-inverse, so an exactly zero factor -- PEFT's ``B = 0`` -- gives 0, not inf);
* ``sylvester_psd``: ``Gb X + X Ga = C`` for symmetric PSD ``Gb``, ``Ga`` through their
  eigendecompositions, ``X = U [(U^T C V) / (l_i + m_j)] V^T``;
* ``adam_direction``: the Adam moment update and bias-corrected direction on stacked tensors;
* ``advance_steps`` / ``mask_pairs`` / ``all_finite``: per-pair step counters and masks (the
  non-finite policy itself is :class:`~altlora.optim.paired.PairedOptimizer`'s).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .paired import r_first
from .sharding import Layout, local_r_first, write_r_first

_WHOLE = Layout(gathered=True)  # baselines mix rows and columns: always work on whole factors

__all__ = [
    "stack_factor", "stack_grad", "write_factor", "sym", "eigh_psd", "pinv_from_eigh",
    "psd_pinv_solve", "sylvester_psd", "adam_direction", "advance_steps", "mask_pairs",
    "new_counter", "all_finite",
]


def stack_factor(ps: Sequence[torch.Tensor], factor: str, dt: torch.dtype) -> torch.Tensor:
    """Rank-first stack of the (whole) factors ``ps`` (``"A"`` or ``"B"``): (n, r, m) in ``dt``."""
    return torch.stack([local_r_first(p, factor, _WHOLE) for p in ps]).to(dt)


def stack_grad(ps: Sequence[torch.Tensor], factor: str, dt: torch.dtype) -> torch.Tensor:
    """Rank-first stack of the (whole) gradients of ``ps``; a missing gradient counts as zero."""
    return torch.stack([local_r_first(p.grad, factor, _WHOLE) if p.grad is not None
                        else torch.zeros(r_first(p, factor).shape, dtype=dt, device=p.device)
                        for p in ps]).to(dt)


def write_factor(ps: Sequence[torch.Tensor], factor: str, new: torch.Tensor) -> None:
    """Copy the rank-first stack ``new`` back into the parameters (casting to their dtype; an
    FSDP2 shard takes its own rows)."""
    write_r_first(ps, factor, _WHOLE, list(new.unbind(0)))


def sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.mT)


def eigh_psd(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a symmetrised PSD matrix with eigenvalues clamped at 0."""
    w, Q = torch.linalg.eigh(sym(gram))
    return w.clamp_min(0.0), Q


def _inverse_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """1/w where w is above the pinv cut-off ``r * eps * max(w)``, else 0 (torch.linalg.pinv's rule)."""
    cut = w.amax(-1, keepdim=True) * (w.shape[-1] * torch.finfo(w.dtype).eps)
    return torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))


def pinv_from_eigh(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``G^+ = Q diag(1/w) Q^T`` from ``eigh(G)``."""
    return (Q * _inverse_eigenvalues(w).unsqueeze(-2)) @ Q.mT


def psd_pinv_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``G^+ rhs`` for a batch of symmetric PSD ``G`` (n, r, r) and ``rhs`` (n, r, m)."""
    w, Q = eigh_psd(gram)
    return Q @ (_inverse_eigenvalues(w).unsqueeze(-1) * (Q.mT @ rhs))


def sylvester_psd(wb: torch.Tensor, U: torch.Tensor, wa: torch.Tensor, V: torch.Tensor,
                  C: torch.Tensor) -> torch.Tensor:
    """Solve ``Gb X + X Ga = C`` with ``Gb = U diag(wb) U^T`` and ``Ga = V diag(wa) V^T`` (PSD).

    ``X = U [(U^T C V) / (wb_i + wa_j)] V^T``; entries whose denominator is below the pinv
    cut-off are set to 0 (the minimum-norm solution when both Grams are singular).
    """
    den = wb.unsqueeze(-1) + wa.unsqueeze(-2)
    scale = torch.maximum(wb.amax(-1), wa.amax(-1))[..., None, None]
    ok = den > scale * (den.shape[-1] * torch.finfo(den.dtype).eps)
    F = (U.mT @ C @ V) / torch.where(ok, den, torch.ones_like(den))
    return U @ torch.where(ok, F, torch.zeros_like(F)) @ V.mT


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, g: torch.Tensor, *,
                   beta1: float, beta2: float, eps: float, bc1: torch.Tensor | float,
                   bc2: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on stacked tensors: returns ``(M, V, (M/bc1) / (sqrt(V/bc2) + eps))`` (out of place).

    ``bc1 = 1 - beta1**t`` and ``bc2 = 1 - beta2**t`` (per pair, shape (n, 1, 1), or 1.0 for no
    bias correction). Same arithmetic as ``torch.optim.AdamW``'s direction.
    """
    M = torch.lerp(exp_avg, g, 1 - beta1)
    V = beta2 * exp_avg_sq + (1 - beta2) * g * g
    return M, V, (M / bc1) / ((V / bc2).sqrt() + eps)


def new_counter(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=p.device)


def advance_steps(states: Sequence[dict], like: torch.Tensor) -> torch.Tensor:
    """Increment each state's CPU ``step`` counter; return the counts as (n, 1, 1) like ``like``.

    Counters are 0-d float32 CPU tensors (as ``torch.optim.AdamW``'s), so reading them never
    synchronises a device.
    """
    for st in states:
        st.setdefault("step", torch.zeros((), dtype=torch.float32))
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    return torch.tensor([s.item() for s in steps], dtype=like.dtype, device=like.device).view(-1, 1, 1)


def all_finite(*ts: torch.Tensor) -> torch.Tensor:
    """(n,) bool: every entry of pair i is finite in every stacked tensor of ``ts``."""
    ok = torch.isfinite(ts[0]).flatten(1).all(1)
    for t in ts[1:]:
        ok = ok & torch.isfinite(t).flatten(1).all(1)
    return ok


def mask_pairs(ok: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the pair is ``ok`` (n,), else ``old``."""
    return torch.where(ok.view(-1, *([1] * (new.dim() - 1))), new, old)
