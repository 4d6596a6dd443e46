"""ScaledGD and Scaled AdamW: Riemannian-preconditioned LoRA (Zhang & Pilanci, ICML 2024).

With ``W = W0 + s B A`` the LoRA gradients are preconditioned by r x r Grams of the *other*
factor, both taken from the factors before the step (Jacobi, as PEFT's
``create_riemannian_optimizer``; the official ``AdamWr`` is Gauss-Seidel by accident of
aliasing)::

    g~_A = (B^T B + delta I)^+ grad_A                      (r x d)
    g~_B = grad_B (A A^T + delta I)^+                       (k x r)

In rank-first form (``X = A`` or ``B^T``, ``Y`` the other factor) both are
``g~_X = (Y Y^T + delta I)^+ grad_X``. ``^+`` is a pseudo-inverse through ``eigh``, so an
exactly zero factor (PEFT's ``B = 0``) gives a zero step instead of inf.

* ScaledGD:     ``X <- X - lr (g~_X + wd X)``.
  With ``delta = 0`` the product ``B_{t+1} A_{t+1}`` is invariant under ``(A, B) -> (R A, B R^-1)``.
* Scaled AdamW: ``m <- b1 m + (1-b1) g~``, ``v <- b2 v + (1-b2) g~^2``,
  ``X <- X - lr (m^ / (sqrt(v^) + eps) + wd X)`` with ``m^ = m / (1 - b1^t)``,
  ``v^ = v / (1 - b2^t)`` when ``correct_bias`` (torch AdamW's arithmetic), else ``m^ = m``,
  ``v^ = v``.

``delta`` (``ridge``) defaults to 1e-6 (the reference GPT-2 code and the AltLoRA paper's
ScaledGD baseline; PEFT uses 1e-2). The paper's ``delta`` is absolute, so PiSSA-scale factors
may need a larger one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..validate import check_betas, check_range
from ._batched import (adam_direction, advance_steps, all_finite, mask_pairs, new_counter, psd_pinv_solve,
                       stack_factor, stack_grad, write_factor)
from .paired import Clip, PairBucket, PairedOptimizer, r_first, state_dtype_for
from .sharding import OTHER

__all__ = ["ScaledGD", "ScaledAdamW", "scaled_gradient"]

def scaled_gradient(grad: torch.Tensor, Y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(Y Y^T + ridge I)^+ grad`` for rank-first stacks ``grad`` (n, r, m) and ``Y`` (n, r, m')."""
    eye = torch.eye(Y.shape[-2], dtype=Y.dtype, device=Y.device)
    return psd_pinv_solve(Y @ Y.mT + ridge * eye, grad)


class _Work(NamedTuple):
    """One factor of one bucket, rank-first stacks (n, r, m): the factor, its gradient, the other."""

    bucket: PairBucket
    factor: str
    states: list[dict]
    X: torch.Tensor
    G: torch.Tensor
    Y: torch.Tensor


class _Scaled(PairedOptimizer):
    _adam = False

    def __init__(self, params: Any, lora_options: dict, *, weight_decay: float, ridge: float,
                 **kwargs: Any) -> None:
        check_range("weight_decay", weight_decay, 0.0, None)
        check_range("ridge", ridge, 0.0, None)
        lora_options.update(weight_decay=weight_decay, ridge=ridge)
        super().__init__(params, lora_options, **kwargs)

    def _state(self, p: torch.Tensor, factor: str, dt: torch.dtype) -> dict:
        st = self.state[p]
        if not st:
            st["nonfinite_skips"] = new_counter(p)
            if self._adam:
                shape = r_first(p, factor).shape
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros(shape, dtype=dt, device=p.device)
                st["exp_avg_sq"] = torch.zeros(shape, dtype=dt, device=p.device)
        return st

    def _read(self, group: dict) -> list[_Work]:
        # Every preconditioner from the pre-step factors (Jacobi): the template computes all, then applies.
        work = []
        for factor in ("A", "B"):
            for bucket in self.pair_buckets(group, needs_grad=factor):
                xs = bucket.factor(factor)
                dt = state_dtype_for(xs[0], self.linalg_dtype)
                work.append(_Work(bucket, factor, [self._state(p, factor, dt) for p in xs], stack_factor(xs, factor, dt),
                                  stack_grad(xs, factor, dt), stack_factor(bucket.other(factor), OTHER[factor], dt)))
        return work

    def _compute(self, group: dict, w: _Work, clip: Clip) -> tuple:
        ok = all_finite(w.G)
        g = scaled_gradient(torch.where(ok.view(-1, 1, 1), w.G, 0.0), w.Y, group["ridge"])
        moments = self._direction(group, w.states, g)
        X_new = w.X - group["lr"] * (moments[-1] + group["weight_decay"] * w.X)
        ok = ok & all_finite(X_new)
        self._raise_if_nonfinite(group, w.bucket.index, ok, f"factor {w.factor}")
        return mask_pairs(ok, X_new, w.X), moments, ok

    def _apply(self, group: dict, w: _Work, update: tuple) -> None:
        X_new, moments, ok = update
        write_factor(w.bucket.factor(w.factor), w.factor, X_new)
        if self._adam:
            M, V, _ = moments
            for key, new in (("exp_avg", M), ("exp_avg_sq", V)):
                old = torch.stack([st[key] for st in w.states])
                torch._foreach_copy_([st[key] for st in w.states], list(mask_pairs(ok, new, old).unbind(0)))
        self._count_skips(w.states, ok)

    def _direction(self, group: dict, states: list[dict], g: torch.Tensor) -> tuple:
        return (g,)


class ScaledGD(_Scaled):
    r"""ScaledGD: ``A <- A - lr ((B^T B + delta I)^+ grad_A + wd A)``, likewise for B (Jacobi).

    Args:
        params: an ``nn.Module`` or parameters / groups with ``model=`` or ``pairs=``.
        lr: learning rate (``group["lr"]`` each step). The reference recipes use SGD-scale
            rates (1e-3 .. 2e-2).
        weight_decay: decoupled decay on A and B, applied to the pre-step value.
        ridge: delta added to both r x r Grams (default 1e-6; 0 = exactly invariant).
        aux_*, on_nonfinite, linalg_dtype: see :class:`~altlora.optim.paired.PairedOptimizer`.
    """

    name = "scaled_gd"
    description = "ScaledGD: r x r Riemannian-preconditioned gradient descent on A and B"

    lr_is_adam_scale = False  # aux_lr defaults to 1e-3, not lr

    def __init__(self, params: Any = None, lr: float = 1e-2, *, weight_decay: float = 0.0,
                 ridge: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(params, dict(lr=lr), weight_decay=weight_decay, ridge=ridge, **kwargs)


class ScaledAdamW(_Scaled):
    r"""Scaled AdamW: AdamW on the Riemannian-preconditioned gradients (Jacobi).

    Args:
        lr, weight_decay, ridge: as :class:`ScaledGD` (default lr 1e-4).
        betas, eps: Adam coefficients (the reference GPT-2 recipe uses ``betas=(0.9, 0.8)``).
        correct_bias: Adam bias correction (default True: PEFT's wrapper around
            ``torch.optim.AdamW`` and the GPT-2 recipe; the Mistral code's ``AdamWr`` defaults
            to False).
    """

    name = "scaled_adamw"
    description = "Scaled AdamW: AdamW on Riemannian-preconditioned LoRA gradients"

    _adam = True

    def __init__(self, params: Any = None, lr: float = 1e-4, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, ridge: float = 1e-6,
                 correct_bias: bool = True, **kwargs: Any) -> None:
        check_betas("betas", betas)
        check_range("eps", eps, 0.0, None)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, correct_bias=bool(correct_bias)),
                         weight_decay=weight_decay, ridge=ridge, **kwargs)

    def _direction(self, group: dict, states: list[dict], g: torch.Tensor) -> tuple:
        beta1, beta2 = group["betas"]
        bc1 = bc2 = 1.0
        if group["correct_bias"]:
            t = advance_steps(states, g)
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        else:
            advance_steps(states, g)
        M = torch.stack([st["exp_avg"] for st in states])
        V = torch.stack([st["exp_avg_sq"] for st in states])
        return adam_direction(M, V, g, beta1=beta1, beta2=beta2, eps=group["eps"], bc1=bc1, bc2=bc2)
