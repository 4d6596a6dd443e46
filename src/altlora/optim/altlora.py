"""AltLoRA (Algorithm 1) and AltLoRA+ (Algorithm 2) of arXiv 2505.12455.

Notation: ``W = W0 + s B A`` with ``A`` (r, d), ``B`` (k, r). Every formula is written for
the *active* factor ``X`` in rank-first form (``X = A`` or ``X = B^T``) with the *other*
factor ``Y`` (``B^T`` or ``A``), so one batched routine serves both half-steps:

* scaled gradient (Thm 1 / Cor. 1, eq. 8):   ``g~ = (1/s^2) (Y Y^T + lam I)^-1 grad_X``
* momentum re-projection (Thm 2 / Cor. 2):    ``M~ = (Y Y^T + lam I)^-1 (Y Y_prev^T) M``
  where ``Y_prev`` is the other factor as it was at the previous update of ``X``;
* Algorithm 1:  ``M <- b1 M~ + (1-b1) g~``;            ``X <- X - lr (M + wd X)``
* Algorithm 2:  ``V <- b2 V + (1-b2) g~ * g~`` (not projected);
  ``X <- X - lr (M / (sqrt(V) + eps) + wd X)``.

``Y Y_prev^T`` is an r x r matrix computed when ``Y``'s phase ends, so the optimizer never
keeps a copy of the other factor: AltLoRA's state is one momentum per factor plus O(r^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..validate import check_betas, check_range
from .paired import Clip, PairBucket, PairedOptimizer, state_dtype_for
from .sharding import (OTHER, Layout, all_reduce_and, as_local, shard_like, all_reduce_sum, full, is_dtensor, layout_of,
                       local_r_first, r_first, write_r_first)

__all__ = ["AltLoRA", "AltLoRAPlus", "altlora_factor_update"]

# batched=None on CPU: stack factors smaller than this (per-call overhead dominates there);
# larger ones go per pair (stacking copies cost more). Measured by benchmarks/optimizer_step.py.
_BATCH_BELOW = 16384
# per-pair path: work on chunks of pairs of about this many factor entries (0.5 MiB in float32)
_CHUNK_NUMEL = 131072
# from this rank on, results for B are laid out like B (see _in_factor_layout); measured by
# benchmarks/optimizer_step.py
_FACTOR_LAYOUT_RANK = 16
_CONVENTIONS = {
    # this library's defaults, each measured in BENCHMARKS.md, section 7.1: both factors updated
    # every step from the same gradient (Table 9's joint update), the full-weight step clipped at
    # 1; if alternating, started on the factor whose gradient is not zero. A class may change
    # some of them (``_convention_overrides``): AltLoRA+ adds a ridge relative to the Gram.
    "default": dict(divide_by_scaling_sq=True, bias_correction="none", first="auto", max_grad_norm=1.0,
                    mode="joint", relative_ridge=0.0),
    # paper: Algorithms 1-2 as printed (1/s^2 scaled gradients, no bias correction, A first,
    # alternating, no clipping, an absolute ridge)
    "paper": dict(divide_by_scaling_sq=True, bias_correction="none", first="A", max_grad_norm=None,
                  mode="alternating", relative_ridge=0.0),
    # released code (LucasXinYu/AltLoRA @ 94b2198): no 1/s^2, first-moment bias correction.
    # Use it to transfer the paper's published learning rates.
    "released_code": dict(divide_by_scaling_sq=False, bias_correction="first", first="A", max_grad_norm=None,
                          mode="alternating", relative_ridge=0.0),
}


def _as(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


def _mm(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
    """``a @ b`` for matrices, or batches of them (the ``batched`` path), contiguous; with
    ``add``, ``beta * add + a @ b`` written into ``add`` (a temporary, whatever its layout)."""
    if add is None:
        return torch.mm(a, b) if a.dim() == 2 else torch.bmm(a, b)
    return add.addmm_(a, b, beta=beta) if a.dim() == 2 else add.baddbmm_(a, b, beta=beta)


def _in_factor_layout(x: torch.Tensor) -> bool:
    """Are the results computed for the rank-first view ``x`` (scaled gradients, moments, the new
    factor) laid out like the factor? Yes for ``B^T`` (a transpose) from rank
    ``_FACTOR_LAYOUT_RANK`` on: elementwise work on B, its gradient and its moments then reads
    memory in order, where transposed reads made it up to 5x slower. Below that rank, BLAS
    writes the (r, r) @ (r, m) products rank-first so much faster (3x at r = 8) that those win."""
    return x.dim() == 2 and x.stride(0) == 1 and x.stride(1) != 1 and x.shape[0] >= _FACTOR_LAYOUT_RANK


def _left_mm(op: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``op @ t`` for r x r ``op`` and rank-first ``t``, laid out as results for ``like`` are."""
    return torch.mm(t.mT, op.mT).mT if _in_factor_layout(like) else _mm(op, t)


def pair_products(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """``x_i y_i^T`` for every pair, stacked (n, r, r); ``xs`` is n (r, m) tensors or one (n, r, m)."""
    if xs[0].dim() == 3:
        return torch.bmm(xs[0], ys[0].mT)
    return torch.stack([torch.mm(x, y.mT) for x, y in zip(xs, ys)])


def _per_pair(t: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split stacked r x r operators to match ``like`` (n tensors, or one stacked tensor)."""
    return [t] if like[0].dim() == 3 else list(t.unbind(0))


def _chunks(xs: list[torch.Tensor]) -> list[slice]:
    """Slices of consecutive pairs holding about ``_CHUNK_NUMEL`` factor entries each (one slice
    for a stacked batch): the (r, m) temporaries of a chunk stay in cache and are freed before
    the next chunk allocates, instead of all pairs' temporaries being alive at once."""
    if xs[0].dim() == 3:
        return [slice(0, 1)]
    parts, start, size = [], 0, 0
    for i, x in enumerate(xs):
        size += x.numel()
        if size >= _CHUNK_NUMEL:
            parts.append(slice(start, i + 1))
            start, size = i + 1, 0
    return parts + ([slice(start, len(xs))] if start < len(xs) else [])


def ridge_inverse(gram: torch.Tensor, ridge: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``K^-1`` for ``K = Y Y^T + lam I`` (n, r, r), and ``info``, non-zero where K is not
    positive definite: one batched Cholesky factorisation, inverted by LAPACK's ``potri``
    (several times faster than ``cholesky_solve`` with r right-hand sides at r >= 64). Every
    operator of a half-step is a product with it (:func:`lifted_sq_norms`,
    :func:`altlora_factor_update`), applied to the (r, m) tensors by matmul: as accurate as
    solving with the m right-hand sides directly (both are limited by the factorisation of K)
    and far faster on CPU, where a triangular solve with thousands of right-hand sides runs far
    below matmul speed."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    L, info = torch.linalg.cholesky_ex(gram + ridge * eye)
    # a pair whose K is not positive definite is skipped; invert I there (potri would raise)
    return torch.cholesky_inverse(torch.where((info == 0).view(-1, 1, 1), L, eye)), info


def lifted_sq_norms(grads: list[torch.Tensor], kinv: torch.Tensor, like: list[torch.Tensor], *,
                    inv_s2: torch.Tensor | float, scaling: torch.Tensor,
                    ridge: torch.Tensor | float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``||s Y^T g~||_F^2`` per pair (n,): the squared norm of the full-weight step that the
    scaled gradient ``g~ = inv_s2 S`` makes (``s B g~_A`` or ``s g~_B A``), and ``S = K^-1 grad``
    per pair (laid out as results for ``like`` are), which the update reuses. At ridge 0 the
    step is the projected full gradient of Theorem 1, ``Proj_c(B) G`` or ``G Proj_r(A)``, so its
    norm does not change under ``(A, B) -> (R A, B R^-1)``.

    From ``K S = grad`` with ``K = Y Y^T + lam I``:
    ``||Y^T S||^2 = <S, Y Y^T S> = <S, grad> - lam ||S||^2``: two dot products, taken on each
    ``S`` while it is in cache, instead of a product of the (r, m) tensors. The difference loses
    relative accuracy only in directions where the ridge dominates the Gram (``lam`` >> its
    eigenvalue), whose share of the norm is small by the same factor; a result rounded below 0
    is clamped.

    Args:
        grads: the gradients, rank-first (r, m) per pair, or one stacked (n, r, m).
        kinv: ``K^-1`` (n, r, r) (:func:`ridge_inverse`); ``like``: the factors.
        scaling: s per pair (n,); ridge: lambda, a number or one per pair (n, 1, 1).
    Sums over the local columns: all-reduce the result over column shards.
    """
    scaled, dots = [], []
    for k, g, x in zip(_per_pair(kinv, grads), grads, like):
        S = _left_mm(k, g, x)
        scaled.append(S)
        dots.append(torch.stack([_dot(S, g), _dot(S, S)], -1).view(-1, 2))
    dots = torch.cat(dots)
    lam = ridge.view(-1) if torch.is_tensor(ridge) else ridge
    inv = inv_s2.view(-1) if torch.is_tensor(inv_s2) else inv_s2
    return ((scaling * inv) ** 2 * (dots[:, 0] - lam * dots[:, 1])).clamp_min(0.0), scaled


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of ``x * y`` over each matrix: a number, or (n,) for stacked (n, r, m) tensors."""
    if x.dim() == 3:
        return torch.linalg.vecdot(x.flatten(1), y.flatten(1))
    if x.stride() == y.stride():  # same layout: one pass in memory order
        if not x.is_contiguous() and x.mT.is_contiguous():
            x, y = x.mT, y.mT
        if x.is_contiguous():
            return torch.dot(x.view(-1), y.view(-1))
    return (x * y).sum()


def altlora_factor_update(
    xs: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor] | None,
    gram: torch.Tensor,
    cross: torch.Tensor,
    *,
    inv_s2: torch.Tensor | float,
    lr: float,
    beta1: float,
    beta2: float = 0.0,
    eps: float = 0.0,
    weight_decay: float = 0.0,
    ridge: torch.Tensor | float = 1e-6,
    bc1: float = 1.0,
    bc2: float = 1.0,
    clip_coef: torch.Tensor | float = 1.0,
    sync_ok: Callable[[torch.Tensor], torch.Tensor] | None = None,
    starts: list[torch.Tensor] | None = None,
    inverse: tuple[torch.Tensor, torch.Tensor] | None = None,
    scaled: list[torch.Tensor] | None = None,
    x_gram: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor, torch.Tensor | None]:
    """One AltLoRA / AltLoRA+ half-step on ``n`` factors (pure function, like ``torch.optim``'s
    functional ``adamw``: lists in, new lists out).

    Args:
        xs: active factors, rank-first, each (r, m) (m may be a column shard), or a single
            stacked (n, r, m) tensor (the batched path; the other lists likewise).
        grads: their LoRA gradients, same shapes.
        exp_avgs: stored first moments M, in the ``Y_prev`` basis.
        exp_avg_sqs: second moments V for AltLoRA+, or None for AltLoRA.
        gram: ``Y Y^T`` of the other factors, stacked (n, r, r), without the ridge.
        cross: ``Y Y_prev^T`` (n, r, r), the basis change since the momentum was stored.
        inv_s2: ``1/s^2`` per pair, shape (n, 1, 1) or a number.
        ridge: lambda, a number or one per pair (n, 1, 1).
        clip_coef: multiplies the scaled gradient ``g~`` before it enters the moments
            (gradient clipping in weight space, see :func:`lifted_sq_norms`).
        sync_ok: combines the per-pair "update is valid" flags across column shards.
        starts: the factors as they were at this phase's start (same layout as ``xs``), or None:
            when given, the basis change ``X_new starts^T`` (this shard's part, (n, r, r)) is
            computed chunk by chunk, while ``X_new`` is still in cache.
        inverse: ``(K^-1, info)`` of :func:`ridge_inverse` for ``gram`` and ``ridge``, if
            already computed.
        scaled: ``K^-1 grads`` (:func:`lifted_sq_norms`), if already computed (clipping needs
            them first); they are overwritten.
        x_gram: ``X X^T`` (n, r, r) of whole factors, for a caller that writes them in place
            (joint updates have it: the other half-step's Gram), the phase starting at X
            (``starts`` is not used). The new factors are then not formed (no factor-sized
            temporary, no copy): ``xs_new`` holds the directions D, ``X_new = (1 - lr wd) X -
            (lr / bc1) D``, and ``cross_new`` the basis change of a one-step phase,
            ``X_new X^T = (1 - lr wd) X X^T - (lr / bc1) D X^T``. A pair's update
            is valid if ``D`` (and V) are finite and the bound ``(1 - lr wd) ||X|| + (lr / bc1)
            ||D||`` on ``||X_new||`` squares to a finite number; pairs that are not ``ok`` must
            not be written.

    The r x r operators ``beta1 K^-1 (Y Y_prev^T)`` (the momentum's basis change, Theorem 2 /
    Corollary 2) and ``K^-1`` (Theorem 1 / Corollary 1), ``K = Y Y^T + lam I``, are applied to
    the (r, m) tensors by matmul (:func:`ridge_inverse`).

    Returns ``(xs_new, exp_avgs_new, exp_avg_sqs_new, ok, cross_new)``, ``cross_new`` the basis
    change ``X_new starts^T`` (None without ``starts`` or ``x_gram``); pairs with ``ok == False``
    (non-finite gradient or update, or a Gram that is not positive definite) come back unchanged
    (their input tensors, and ``X starts^T``).
    """
    carry, g_scaled, info = _operators(grads, xs, gram, cross, exp_avg_sqs is not None, ridge=ridge, beta1=beta1,
                                       clip_coef=clip_coef, inv_s2=inv_s2, inverse=inverse, scaled=scaled)
    decay, step = 1 - lr * weight_decay, lr / bc1
    x_new, m_new, v_new, norms, crosses_new = [], [], None if exp_avg_sqs is None else [], [], []
    for part in _chunks(xs):
        d, m, v = _moments_and_direction(g_scaled[part], exp_avgs[part],
                                         None if exp_avg_sqs is None else exp_avg_sqs[part], carry[part],
                                         beta1=beta1, beta2=beta2, eps=eps, bc2=bc2)
        if x_gram is not None:  # the caller writes X <- decay X - step D
            x, x_starts = d, xs[part]
        else:  # X - lr (D / bc1 + wd X), into D's buffer where D is a temporary (Algorithm 2)
            x = (list(torch._foreach_add(xs[part], d, alpha=-step)) if v is None
                 else [torch.add(x, dd, alpha=-step, out=dd) for x, dd in zip(xs[part], d)])
            if weight_decay:
                torch._foreach_add_(x, xs[part], alpha=-lr * weight_decay)
            x_starts = None if starts is None else starts[part]
        x_new += x
        m_new += m
        if v is not None:
            v_new += v
        # V is not finite exactly when the squared scaled gradient is not
        norms.append(_pair_norms(x + (v or []), len(x) if x[0].dim() == 2 else x[0].shape[0]))
        if x_starts is not None:
            crosses_new.append(pair_products(x, x_starts))
    # A non-finite gradient always reaches X_new (K^-1 has a positive diagonal). The 2-norm also
    # flags entries whose square overflows: such a factor would break the next step's Gram.
    norms = torch.cat(norms, dim=1)
    ok = (info == 0) & norms.isfinite().all(0)
    if x_gram is not None:
        bound = decay * x_gram.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt() + step * norms[0]
        ok &= (bound * bound).isfinite()
        cross_new = decay * x_gram - step * torch.cat(crosses_new)
    else:
        cross_new = torch.cat(crosses_new) if starts is not None else None
    if sync_ok is not None:
        ok = sync_ok(ok)
    if not bool(ok.all()):  # pairs that are not ok keep their input tensors
        x_new = x_new if x_gram is not None else _keep_failed(ok, x_new, xs)
        m_new = _keep_failed(ok, m_new, exp_avgs)
        v_new = None if v_new is None else _keep_failed(ok, v_new, exp_avg_sqs)
        if cross_new is not None:
            kept = x_gram if x_gram is not None else pair_products(xs, starts)  # X starts^T
            cross_new = torch.where(ok.view(-1, 1, 1), cross_new, kept)
    return x_new, m_new, v_new, ok, cross_new


def _operators(grads: list[torch.Tensor], xs: list[torch.Tensor], gram: torch.Tensor, cross: torch.Tensor,
               second_moment: bool, *, ridge: torch.Tensor | float, beta1: float, clip_coef: torch.Tensor | float,
               inv_s2: torch.Tensor | float, inverse: tuple[torch.Tensor, torch.Tensor] | None,
               scaled: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The momentum operators ``carry = b1 K^-1 C`` per pair, the scaled gradients
    ``clip K^-1 grad / s^2`` (times ``1 - b1`` for Algorithm 1, whose moment is accumulated on
    them in place) and Cholesky's ``info``."""
    kinv, info = ridge_inverse(gram, ridge) if inverse is None else inverse
    carry = _per_pair(beta1 * (kinv @ cross), xs)
    factor = clip_coef * inv_s2 * (1.0 if second_moment else 1 - beta1)
    if scaled is None:
        g_scaled = [_left_mm(q, g, x) for q, g, x in zip(_per_pair(factor * kinv, xs), grads, xs)]
    else:
        g_scaled = _scale(scaled, factor)
    return carry, g_scaled, info


def _scale(ts: list[torch.Tensor], factor: torch.Tensor | float) -> list[torch.Tensor]:
    """``ts`` multiplied in place by ``factor``: a number, or a tensor with one value per pair
    (n, 1, 1) or one for all."""
    if not torch.is_tensor(factor):
        torch._foreach_mul_(ts, factor)
    elif ts[0].dim() == 3:  # stacked: broadcasts
        ts[0].mul_(factor.to(ts[0].dtype))
    else:
        f = factor.to(ts[0].dtype).reshape(-1)
        torch._foreach_mul_(ts, f[0] if f.numel() == 1 else list(f.unbind(0)))
    return ts


def _moments_and_direction(g_scaled: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                           exp_avg_sqs: list[torch.Tensor] | None, carry: list[torch.Tensor], *, beta1: float,
                           beta2: float, eps: float, bc2: float
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """Algorithm 1 or 2 on some pairs, given the momentum operators ``carry = b1 K^-1 C`` and the
    scaled gradients (:func:`_operators`): the directions D (``X_new = X - lr (D / bc1 + wd X)``),
    the new moments (first in the scaled gradients' buffers) and the new second moments."""
    if exp_avg_sqs is None:   # Algorithm 1: M = K^-1 (b1 C M + (1-b1) g / s^2), summed in place; D = M
        m_new = [_mm(c, m, add=gs) for c, gs, m in zip(carry, g_scaled, exp_avgs)]
        return m_new, m_new, None
    # Algorithm 2: the scaled gradient also feeds the second moment; D = M / (sqrt(V / bc2) + eps)
    v_new = list(torch._foreach_mul(exp_avg_sqs, beta2))
    torch._foreach_addcmul_(v_new, g_scaled, g_scaled, value=1 - beta2)
    m_new = [_mm(c, m, add=gs, beta=1 - beta1) for gs, c, m in zip(g_scaled, carry, exp_avgs)]
    denom = torch._foreach_sqrt(v_new)
    if bc2 != 1.0:
        torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    return [torch.div(m, d, out=d) for m, d in zip(m_new, denom)], m_new, v_new


def _pair_norms(ts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Frobenius norm of every pair's part of every tensor in ``ts``, as (len(ts) / per-pair, n)."""
    if ts[0].dim() == 2:  # n tensors per kind, one per pair
        return torch.stack(torch._foreach_norm(ts)).view(-1, n)
    return torch.cat([torch.linalg.vector_norm(t, dim=(1, 2)) for t in ts]).view(-1, n)  # stacked (n, r, m)


def _keep_failed(ok: torch.Tensor, new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """``new`` with the pairs that are not ``ok`` replaced by ``old`` (per-pair lists or stacked)."""
    if new[0].dim() == 3:
        return [torch.where(ok[:, None, None], new[0], old[0])]
    return [n if good else o for n, o, good in zip(new, old, ok.tolist())]


@dataclass
class _HalfStep:
    """One factor of one bucket of pairs, read for a step: rank-first views (lists of (r, m)
    tensors, or one stacked (n, r, m) tensor when ``batched``) and the other factor's Gram."""

    factor: str
    bucket: PairBucket
    params: list[torch.Tensor]
    x_lay: Layout
    X: list[torch.Tensor]
    G: list[torch.Tensor]
    M: list[torch.Tensor]
    V: list[torch.Tensor] | None
    x_states: list[dict]
    y_states: list[dict]
    gram: torch.Tensor
    ridge: torch.Tensor | float
    inv_s2: torch.Tensor | float
    batched: bool
    inverse: tuple[torch.Tensor, torch.Tensor]  # (Y Y^T + lam I)^-1 and Cholesky's info
    scaled: list[torch.Tensor] | None = None  # K^-1 G, when clipping computed them first
    x_gram: torch.Tensor | None = None  # X X^T, when the update may write X in place (joint updates)


@dataclass
class _HalfUpdate:
    """What a half-step writes: new factor values (or the directions to apply in place) and
    moments (lists, per pair), which pairs are ``ok``, and the basis change (or phase-start
    snapshots) for the other factor's momentum."""

    X: list[torch.Tensor]
    M: list[torch.Tensor]
    V: list[torch.Tensor] | None
    ok: torch.Tensor
    cross: torch.Tensor | None
    snapshots: list[torch.Tensor] | None
    in_place: tuple[float, float] | None = None  # X holds directions D: X <- a X - b D, (a, b)


class AltLoRABase(PairedOptimizer):
    """Shared implementation; see :class:`AltLoRA` and :class:`AltLoRAPlus`."""

    _second_moment = False
    clips_in_own_geometry = True  # max_grad_norm: see lifted_sq_norms

    #: this class's changes to a convention's values: {convention: {option: value}}
    _convention_overrides: dict[str, dict[str, Any]] = {}

    @classmethod
    def convention_defaults(cls, convention: str) -> dict[str, Any]:
        """The values a convention gives the options left at None."""
        return {**_CONVENTIONS[convention], **cls._convention_overrides.get(convention, {})}

    def __init__(self, params: Any, lora_options: dict, *, switch_every: int, first: str | None,
                 mode: str | None, convention: str, divide_by_scaling_sq: bool | None,
                 bias_correction: str | bool | None, weight_decay: float, ridge: float,
                 relative_ridge: float | None, max_grad_norm: float | None, batched: bool | None,
                 **kwargs: Any) -> None:
        if convention not in _CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(_CONVENTIONS)}, got {convention!r}")
        preset = self.convention_defaults(convention)  # fills every option left at None
        # options given that only an alternation uses: they imply mode="alternating"
        orders = [f"first={first!r}"] if first in ("A", "B") else []
        if switch_every != 1:
            orders.append(f"switch_every={switch_every!r}")
        mode = ("alternating" if orders else preset["mode"]) if mode is None else mode
        if mode == "joint" and orders:
            raise ValueError(f"{' and '.join(orders)} set an order of alternating updates, but mode='joint' "
                             "updates both factors every step: pass mode='alternating', or drop them")
        relative_ridge = preset["relative_ridge"] if relative_ridge is None else relative_ridge
        first = preset["first"] if first is None else first
        max_grad_norm = preset["max_grad_norm"] if max_grad_norm is None else max_grad_norm
        divide_by_scaling_sq = preset["divide_by_scaling_sq"] if divide_by_scaling_sq is None else divide_by_scaling_sq
        bias_correction = preset["bias_correction"] if bias_correction is None else bias_correction
        if not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"switch_every must be an integer >= 1, got {switch_every!r}")
        if first not in ("A", "B", "auto"):
            raise ValueError(f"first must be 'A', 'B' or 'auto', got {first!r}")
        check_range("relative_ridge", relative_ridge, 0.0, None)
        if max_grad_norm is not None:
            check_range("max_grad_norm", max_grad_norm, 0.0, None)
        if batched not in (None, True, False):
            raise ValueError(f"batched must be None (automatic), True or False, got {batched!r}")
        if mode not in ("alternating", "joint"):
            raise ValueError(f"mode must be 'alternating' or 'joint', got {mode!r}")
        check_range("weight_decay", weight_decay, 0.0, None)
        check_range("ridge", ridge, 0.0, None)
        bias_correction = {True: "both", False: "none"}.get(bias_correction, bias_correction)
        if bias_correction not in ("none", "first", "both"):
            raise ValueError(f"bias_correction must be 'none', 'first' or 'both', got {bias_correction!r}")
        lora_options.update(
            weight_decay=weight_decay, ridge=ridge, relative_ridge=relative_ridge,
            switch_every=switch_every, first=first,
            mode=mode, divide_by_scaling_sq=bool(divide_by_scaling_sq),
            bias_correction=bias_correction, batched=batched,
        )
        super().__init__(params, lora_options, **kwargs)
        self.max_grad_norm = max_grad_norm or None

    # ---------------------------------------------------------------- schedule
    def _resolve_first(self, group: dict) -> None:
        """``first="auto"``: start with the factor whose gradient is not zero by construction. If
        every B of the group is zero (PEFT's init), grad_A = s B^T G is zero: start with B; if
        every A is zero, start with A; otherwise A (Algorithm 1). Decided once, at the first
        step, and stored in the group (so a checkpoint keeps it)."""
        if group["first"] != "auto":
            return
        ps = group["params"]

        def all_zero(factor: int) -> bool:
            return all(not bool(full(p).any()) for p in ps[factor::2])

        group["first"] = "B" if all_zero(1) else "A"

    @staticmethod
    def _phase_length(group: dict) -> int:
        return 1 if group["mode"] == "joint" else group["switch_every"]

    @staticmethod
    def _active(group: dict, t: int) -> tuple[str, ...]:
        if group["mode"] == "joint":
            return ("A", "B")
        block = t // group["switch_every"]
        return (group["first"],) if block % 2 == 0 else (OTHER[group["first"]],)

    @staticmethod
    def _update_count(group: dict, factor: str, t: int) -> int:
        """How many times ``factor`` has been updated after the step with index ``t``."""
        if group["mode"] == "joint":
            return t + 1
        k = group["switch_every"]
        block, within = divmod(t, k)
        is_first = factor == group["first"]
        done = (block + 1) // 2 if is_first else block // 2
        current = within + 1 if (block % 2 == 0) == is_first else 0
        return done * k + current

    def phase(self, group: dict | None = None) -> str:
        group = group if group is not None else next(g for g in self.param_groups if g.get("lora"))
        self._resolve_first(group)
        return "".join(self._active(group, group["step"]))

    def _coefficients(self, group: dict) -> tuple[float, float, float]:
        raise NotImplementedError

    # ---------------------------------------------------------------- step
    def _read(self, group: dict) -> list[_HalfStep]:
        self._resolve_first(group)
        halves = [self._gather(group, bucket, factor)
                  for factor in self._active(group, group["step"])
                  for bucket in self.pair_buckets(group, needs_grad=factor)]
        # Joint updates: a factor's Gram X X^T is the other half-step's Y Y^T, so its update can
        # be written in place (altlora_factor_update's x_gram) where X is a whole tensor (not an
        # FSDP2 shard) of the state dtype (not a cast copy).
        grams = {(h.factor, tuple(h.bucket.index)): h.gram for h in halves}
        for h in halves:
            if not is_dtensor(h.params[0]) and h.params[0].dtype == h.X[0].dtype:
                h.x_gram = grams.get((OTHER[h.factor], tuple(h.bucket.index)))
        return halves

    def _clip(self, reads: list[tuple[dict, list[_HalfStep]]]) -> Clip:
        """Global clipping of the full-weight steps (:func:`lifted_sq_norms`), with the aux tensors."""
        if not self.max_grad_norm:
            return Clip()
        norms = []
        for group, halves in reads:
            if halves:
                sq = torch.cat([self._lifted_sq_norms(group, h) for h in halves]).to(torch.float64)
                norms.append(torch.where(sq.isfinite(), sq, 0.0).sum())
        return self._clip_to(norms)

    def _state(self, group: dict, p: torch.Tensor, like: torch.Tensor, factor: str, layout: Layout) -> dict:
        """State of factor ``p``; ``like`` is its (local) rank-first view in the state dtype.
        Moments have the factor's shape, and its memory layout where the update computes in it
        (:func:`_in_factor_layout`; below that rank B's moments are transposes of contiguous
        (r, k) tensors); for a column-sharded factor they are DTensors sharded like it
        (:func:`shard_like`). Phases of several steps also keep the factor as it was at
        the phase's start (``phase_start``). The keys never change, as checkpoint tools that load
        into a template expect."""
        st = self.state[p]
        if not st:
            dev, dt, r = like.device, like.dtype, like.shape[0]

            def zeros() -> torch.Tensor:
                z = torch.zeros_like(like) if _in_factor_layout(like) else torch.zeros(like.shape, dtype=dt, device=dev)
                return shard_like(r_first(z, factor), p, layout)

            st["exp_avg"] = zeros()
            if self._second_moment:
                st["exp_avg_sq"] = zeros()
            if self._phase_length(group) > 1:
                st["phase_start"] = zeros()
            st["basis_cross"] = torch.zeros(r, r, dtype=dt, device=dev)
            st["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=dev)
        return st

    def _gather(self, group: dict, bucket: PairBucket, factor: str) -> _HalfStep:
        """Rank-first views of one bucket's active factor, its gradient and state, and the Gram
        of the other factor (all-reduced over column shards)."""
        other = OTHER[factor]
        params, others = bucket.factor(factor), bucket.other(factor)
        x_lay, y_lay = layout_of(params[0], factor), layout_of(others[0], other)
        dt = state_dtype_for(params[0], self.linalg_dtype)

        # rank-first views, cast to the state precision (no copy when the dtypes agree)
        X = [_as(local_r_first(p, factor, x_lay), dt) for p in params]
        G = [_as(local_r_first(p.grad, factor, x_lay), dt) for p in params]
        Y = [_as(local_r_first(q, other, y_lay), dt) for q in others]
        x_states = [self._state(group, p, X[0], factor, x_lay) for p in params]
        y_states = [self._state(group, q, Y[0], other, y_lay) for q in others]
        M = [r_first(as_local(s["exp_avg"]), factor) for s in x_states]
        V = [r_first(as_local(s["exp_avg_sq"]), factor) for s in x_states] if self._second_moment else None
        batched = group.get("batched")
        if batched is None:
            batched = X[0].device.type == "cuda" or X[0].numel() < _BATCH_BELOW
        if batched:  # one (n, r, m) tensor each: a few large kernels instead of n small ones
            X, G, Y, M = ([torch.stack(ts)] for ts in (X, G, Y, M))
            V = [torch.stack(V)] if V is not None else None
        gram = all_reduce_sum(pair_products(Y, Y), y_lay)
        ridge = group["ridge"]
        if group["relative_ridge"]:  # lambda + rho * (mean eigenvalue of Y Y^T), per pair
            ridge = ridge + group["relative_ridge"] / gram.shape[-1] * gram.diagonal(dim1=-2, dim2=-1).sum(-1)
            ridge = ridge.view(-1, 1, 1)
        if group["divide_by_scaling_sq"]:
            inv_s2 = torch.tensor([1.0 / s**2 for s in bucket.scaling], dtype=dt, device=gram.device).view(-1, 1, 1)
        else:
            inv_s2 = 1.0
        return _HalfStep(factor, bucket, params, x_lay, X, G, M, V, x_states, y_states, gram, ridge,
                         inv_s2, batched, ridge_inverse(gram, ridge))

    @staticmethod
    def _lifted_sq_norms(group: dict, h: _HalfStep) -> torch.Tensor:
        """The clipped norms of one half-step; keeps its scaled gradients for :meth:`_compute`."""
        scaling = torch.tensor(h.bucket.scaling, dtype=h.gram.dtype, device=h.gram.device)
        kinv, info = h.inverse
        sq, h.scaled = lifted_sq_norms(h.G, kinv, h.X, inv_s2=h.inv_s2, scaling=scaling, ridge=h.ridge)
        # a pair whose K is not positive definite is skipped: left out, as non-finite ones are
        return all_reduce_sum(torch.where(info == 0, sq, 0.0), h.x_lay)

    def _compute(self, group: dict, h: _HalfStep, clip: Clip) -> _HalfUpdate:
        """Algorithm 1 or 2 for one half-step (:func:`altlora_factor_update`), plus the Theorem 2
        bookkeeping: the r x r basis change the other factor's momentum will need."""
        factor, X, states, t = h.factor, h.X, h.x_states, group["step"]
        every = self._phase_length(group)
        phase_first, phase_last = t % every == 0, (t + 1) % every == 0
        # At a phase's first step the other factor has moved since this factor's last update:
        # use the stored basis change; otherwise Y_prev = Y and the change is the Gram itself.
        basis = torch.stack([s["basis_cross"] for s in h.y_states]) if phase_first else h.gram
        beta1, beta2, eps = self._coefficients(group)
        n_updates = self._update_count(group, factor, t)
        bc = group["bias_correction"]
        bc1 = 1 - beta1**n_updates if bc in ("first", "both") else 1.0
        bc2 = 1 - beta2**n_updates if bc == "both" and self._second_moment else 1.0

        # Basis change r x r that the *other* factor's momentum will need (Thm 2): X_new X_start^T,
        # at the phase's last step.
        starts = None
        if phase_last:
            saved = [s.get("phase_start") for s in states]
            if every == 1 or any(x is None for x in saved):  # a one-step phase started where X is
                starts = X
            else:
                starts = [r_first(as_local(x), factor) for x in saved]
                starts = [torch.stack(starts)] if h.batched else starts
        lr, wd = group["lr"], group["weight_decay"]
        # a one-step phase of whole factors whose Gram is known: _apply writes them in place
        x_gram = h.x_gram if starts is X else None
        X_new, M_new, V_new, ok, cross_new = altlora_factor_update(
            X, h.G, h.M, h.V, h.gram, basis, inv_s2=h.inv_s2, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=wd, ridge=h.ridge, bc1=bc1, bc2=bc2,
            clip_coef=1.0 if clip.coef is None else clip.coef.to(h.gram.dtype),
            sync_ok=lambda flags: all_reduce_and(flags, h.x_lay), starts=starts, inverse=h.inverse,
            scaled=h.scaled, x_gram=x_gram,
        )
        in_place = None if x_gram is None else (1 - lr * wd, lr / bc1)
        self._raise_if_nonfinite(group, h.bucket.index, ok, f"factor {factor}")
        cross_out = None if cross_new is None else all_reduce_sum(cross_new, h.x_lay)
        snapshots = None
        if phase_first and not phase_last:  # copied into phase_start by _apply, before the factor is written
            snapshots = list(X[0].unbind(0)) if h.batched else X
        if h.batched:
            X_new, M_new = list(X_new[0].unbind(0)), list(M_new[0].unbind(0))
            V_new = list(V_new[0].unbind(0)) if V_new is not None else None
        return _HalfUpdate(X_new, M_new, V_new, ok, cross_out, snapshots, in_place)

    def _apply(self, group: dict, h: _HalfStep, u: _HalfUpdate) -> None:
        factor, states = h.factor, h.x_states
        if u.snapshots is not None:  # the factor at this phase's start, in its own layout
            torch._foreach_copy_([r_first(as_local(s["phase_start"]), factor) for s in states], u.snapshots)
        if u.in_place is None:
            write_r_first(h.params, factor, h.x_lay, u.X)
        else:  # X <- a X - b D on the pairs that are ok
            a, b = u.in_place
            keep = u.ok.tolist()
            xs = [r_first(p, factor) for p, good in zip(h.params, keep) if good]
            if xs:
                if a != 1.0:
                    torch._foreach_mul_(xs, a)
                torch._foreach_add_(xs, [d for d, good in zip(u.X, keep) if good], alpha=-b)
        # adopt the new moment tensors (no copy) in the factor's own layout
        for s, m, p in zip(states, u.M, h.params):
            s["exp_avg"] = shard_like(r_first(m, factor), p, h.x_lay)
        for s, v, p in zip(states, u.V or (), h.params):
            s["exp_avg_sq"] = shard_like(r_first(v, factor), p, h.x_lay)
        if u.cross is not None:
            torch._foreach_copy_([s["basis_cross"] for s in states], list(u.cross.unbind(0)))
        self._count_skips(states, u.ok)


class AltLoRA(AltLoRABase):
    r"""AltLoRA (Algorithm 1): alternating projected-gradient steps with projected momentum.

    Algorithm 1's ``step()`` updates one factor of every LoRA pair (A first), using the
    least-squares-optimal scaled gradient ``(1/s^2)(B^T B + lam I)^-1 grad_A`` (Theorem 1,
    Corollary 1) or ``(1/s^2) grad_B (A A^T + lam I)^-1``, and heavy-ball momentum that is
    re-projected onto the new subspace whenever the other factor moved (Theorem 2,
    Corollary 2). Weight decay enters as ``lr * (M + weight_decay * X)``. Other trainable
    tensors (heads, biases, DoRA magnitudes) are updated by AdamW inside this optimizer.

    By default (``convention="default"``) every step updates both factors from the same
    gradient, each with its own scaled gradient and re-projected momentum (``mode="joint"``, the
    paper's Table 9 ablation, still transformation-invariant): at our budgets it trained better
    than alternation, which gives each factor half the updates (BENCHMARKS.md, section 7.1).
    ``mode="alternating"`` is the alternation; ``convention="paper"`` is Algorithm 1 as printed.

    Args:
        params: an ``nn.Module`` (its LoRA pairs are found by structure), or parameters /
            param groups together with ``model=`` or ``pairs=``.
        lr: learning rate (read from ``group["lr"]`` every step, so schedulers work).
        beta1: momentum coefficient (paper default 0.9).
        weight_decay: gamma of Algorithm 1, applied to the LoRA factors.
        ridge: lambda added to the r x r Grams (Corollaries 1-2; paper 1e-6).
        relative_ridge: rho, adding ``rho * trace(Y Y^T) / r`` (the Gram's mean eigenvalue) to
            lambda, per pair and step. It damps the scaled gradient and, more, the re-projected
            momentum in the directions where the other factor is weak (BENCHMARKS.md, section
            7.2). None: the convention's value (0; 1 for AltLoRA+ under ``"default"``). Not
            transformation-invariant when > 0.
        switch_every: optimizer steps per phase when alternating (1 = the paper's strict
            alternation).
        first: the factor an alternation starts with: ``"A"`` (Algorithm 1), ``"B"`` (the
            paper's ablation) or ``"auto"`` (B when every B is zero, PEFT's init). Giving
            ``"A"``/``"B"`` or ``switch_every`` > 1 without ``mode`` selects alternation.
        mode: ``"joint"`` (both factors every step from the same gradient: the Table 9
            ablation) or ``"alternating"`` (Algorithms 1-2). None: ``"alternating"`` if
            ``first`` ("A" or "B") or ``switch_every`` > 1 is given, else the convention's value
            (``"joint"`` under ``"default"``, ``"alternating"`` under the others).
        convention: ``"default"`` (this library's measured defaults: joint updates, the
            full-weight step clipped at 1, ``first="auto"`` if alternating), ``"paper"``
            (Algorithms 1-2 as printed: alternating, A first, no clipping, an absolute ridge) or
            ``"released_code"`` (as the paper, with no 1/s^2 and first-moment bias correction, as
            the authors' code; use it to reuse their learning rates). It fills every option left
            at None.
        divide_by_scaling_sq, bias_correction: override the convention's choices;
            ``bias_correction`` is ``"none"``, ``"first"`` or ``"both"``.
        batched: stack equal-shape pairs into (n, r, m) tensors and use batched matmuls
            (``True``), or one matmul per pair without stacking copies (``False``). ``None``
            picks batched on CUDA, where kernel launches dominate, and on CPU for factors of
            under 16K entries; larger CPU factors go per pair, where the stacking copies cost
            more than they save (``benchmarks/optimizer_step.py``).
        model, pairs: where the LoRA pairs come from (``pairs`` accepts ``LoRAPair`` or
            ``(A, B, scaling[, name])`` tuples for non-PEFT models).
        aux_lr, aux_betas, aux_eps, aux_weight_decay: AdamW options for non-LoRA tensors.
        on_nonfinite: ``"skip"`` (skip and count the pair for that step) or ``"raise"``.
        linalg_dtype: ``torch.float64`` to do state and r x r algebra in double precision.
    """

    name = "altlora"
    description = "AltLoRA (Algorithm 1): projected gradients with projected momentum, both factors every step"

    lr_is_adam_scale = False  # aux_lr defaults to 1e-3, not lr

    def __init__(self, params: Any = None, lr: float = 0.3, *, beta1: float = 0.9,
                 weight_decay: float = 0.0, ridge: float = 1e-6, relative_ridge: float | None = None,
                 max_grad_norm: float | None = None, switch_every: int = 1,
                 first: str | None = None, mode: str | None = None, convention: str = "default",
                 divide_by_scaling_sq: bool | None = None,
                 bias_correction: str | bool | None = None, batched: bool | None = None,
                 **kwargs: Any) -> None:
        check_range("beta1", beta1, 0.0, 1.0)
        super().__init__(params, dict(lr=lr, beta1=beta1), switch_every=switch_every,
                         first=first, mode=mode, convention=convention,
                         divide_by_scaling_sq=divide_by_scaling_sq,
                         bias_correction=bias_correction, weight_decay=weight_decay,
                         ridge=ridge, relative_ridge=relative_ridge, max_grad_norm=max_grad_norm,
                         batched=batched, **kwargs)

    def _coefficients(self, group: dict) -> tuple[float, float, float]:
        return group["beta1"], 0.0, 0.0


class AltLoRAPlus(AltLoRABase):
    r"""AltLoRA+ (Algorithm 2): AltLoRA plus an Adam-style second moment.

    The stored first moment is the *projected* one (as in the paper, unlike the released
    code); the second moment is the EMA of the squared scaled gradient and is not projected;
    ``eps`` is added outside the square root; no bias correction unless asked for.
    Arguments are those of :class:`AltLoRA` with ``betas=(beta1, beta2)`` and ``eps``.

    Under the ``"default"`` convention both factors are updated every step (as for AltLoRA) with
    a ridge relative to the Gram (``relative_ridge=1``): at lr 1e-3 that trained better than or
    as well as LoRA-AdamW at both budgets of both quality tasks and on the default job, where
    the alternating method trailed (BENCHMARKS.md, section 7.1). Algorithm 2 as printed is
    ``convention="paper"``; the alternating method with this library's other defaults is
    ``mode="alternating", relative_ridge=0``.
    """

    name = "altlora_plus"
    _convention_overrides = {"default": dict(relative_ridge=1.0)}
    description = "AltLoRA+ (Algorithm 2): AltLoRA plus an unprojected second moment and a relative ridge"

    _second_moment = True

    def __init__(self, params: Any = None, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, ridge: float = 1e-6,
                 relative_ridge: float | None = None, max_grad_norm: float | None = None,
                 switch_every: int = 1, first: str | None = None, mode: str | None = None,
                 convention: str = "default", divide_by_scaling_sq: bool | None = None,
                 bias_correction: str | bool | None = None, batched: bool | None = None,
                 **kwargs: Any) -> None:
        check_betas("betas", betas)
        check_range("eps", eps, 0.0, None)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps),
                         switch_every=switch_every, first=first, mode=mode,
                         convention=convention, divide_by_scaling_sq=divide_by_scaling_sq,
                         bias_correction=bias_correction, weight_decay=weight_decay,
                         ridge=ridge, relative_ridge=relative_ridge, max_grad_norm=max_grad_norm,
                         batched=batched, **kwargs)

    def _coefficients(self, group: dict) -> tuple[float, float, float]:
        beta1, beta2 = group["betas"]
        return beta1, beta2, group["eps"]
