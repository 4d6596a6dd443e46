"""LoRA-Pro (Wang et al., ICLR 2025): LoRA steps whose induced full update is the tangent-space
projection of a full-weight step.

With ``W = W0 + s B A``, ``G = dL/dW`` (never formed), ``grad_A = s B^T G`` and
``grad_B = s G A^T``, a LoRA step along ``(g_A, g_B)`` moves W by the *equivalent gradient*
``g~ = s (B g_A + g_B A)``. Theorem 2.1: ``min ||g~ - G||_F`` is attained by

    g_A = (1/s^2) (B^T B)^-1 grad_A + X A
    g_B = (1/s^2) (I - P_B) grad_B (A A^T)^-1 - B X,       P_B = B (B^T B)^-1 B^T

for any r x r ``X``, and then ``g~ = P_B G + G P_A - P_B G P_A`` (``P_A = A^T (A A^T)^-1 A``).
Theorem 2.2 picks X closest to the plain LoRA gradients, the Sylvester equation

    (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^-1 grad_A A^T.

Implementation: ``B^T B + delta I = U diag(l) U^T`` and ``A A^T + delta I = V diag(m) V^T``
(two batched r x r ``eigh``) give both pseudo-inverses and ``X = U [(U^T C V) / (l_i + m_j)] V^T``;
``(I - P_B) T`` is ``T - B ((B^T B)^+ (B^T T))``, so no k x k projector is ever formed. With a
zero factor (PEFT's ``B = 0`` or an embedding's ``A = 0``) the pseudo-inverses give the paper's
first-step branch automatically (``g_A = 0``, ``g_B = (1/s^2) grad_B (A A^T)^-1``).

* :class:`LoRAProSGD`: ``X <- X - lr (g_X + wd X)`` (pre-release ``peta.optim.SGD``).
* :class:`LoRAPro` (the paper's AdamW, "full"): Adam on the full-size equivalent gradient,

      g~ = s (B g_A0 + g_B0 A)   (X = 0),   M <- b1 M + (1-b1) g~,   V <- b2 V + (1-b2) g~^2,
      G^ = (M / (1-b1^t)) / (sqrt(V / (1-b2^t)) + eps)                         (k x d)

  then ``G^`` is re-projected as a full gradient (``grad_A' = s B^T G^``, ``grad_B' = s G^ A^T``),
  mapped through Theorem 2.1/2.2 and applied by SGD. State: M and V of size k x d per pair
  (2kd floats, the method's cost), stored with the A factor and updated in place. Unlike the official code the bias
  correction uses the true step count and the inverses are never cast to bf16.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..pairing import as_matrix
from ..validate import check_betas, check_range
from ._batched import (advance_steps, all_finite, eigh_psd, mask_pairs, new_counter, pinv_from_eigh,
                       stack_factor, stack_grad, sylvester_psd, write_factor)
from .paired import Clip, PairBucket, PairedOptimizer, state_dtype_for

__all__ = ["LoRAPro", "LoRAProSGD", "GramBasis", "gram_basis", "lora_pro_gradients",
           "equivalent_gradient"]


class GramBasis(NamedTuple):
    """Eigendecompositions and pseudo-inverses of ``B^T B + dI`` and ``A A^T + dI`` (n, r, r)."""

    wb: torch.Tensor
    U: torch.Tensor
    wa: torch.Tensor
    V: torch.Tensor
    Gb_inv: torch.Tensor
    Ga_inv: torch.Tensor


def gram_basis(A: torch.Tensor, B: torch.Tensor, ridge: float) -> GramBasis:
    """For ``A`` (n, r, d) and ``B`` (n, k, r)."""
    eye = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device)
    wb, U = eigh_psd(B.mT @ B + ridge * eye)
    wa, V = eigh_psd(A @ A.mT + ridge * eye)
    return GramBasis(wb, U, wa, V, pinv_from_eigh(wb, U), pinv_from_eigh(wa, V))


def lora_pro_gradients(basis: GramBasis, A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor,
                       grad_B: torch.Tensor, inv_s2: torch.Tensor | float,
                       solve_x: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Theorem 2.1 with the Theorem 2.2 ``X`` (or ``X = 0``): returns ``(g_A, g_B, X)``.

    Shapes: ``A``, ``grad_A`` (n, r, d); ``B``, ``grad_B`` (n, k, r); ``inv_s2`` (n, 1, 1).
    """
    term_A = inv_s2 * (basis.Gb_inv @ grad_A)                  # (1/s^2)(B^T B)^-1 grad_A
    T = inv_s2 * (grad_B @ basis.Ga_inv)                       # (1/s^2) grad_B (A A^T)^-1
    term_B = T - B @ (basis.Gb_inv @ (B.mT @ T))               # (I - P_B) T, O(k r^2)
    if not solve_x:
        return term_A, term_B, torch.zeros_like(basis.U)
    X = sylvester_psd(basis.wb, basis.U, basis.wa, basis.V, -(term_A @ A.mT))
    return term_A + X @ A, term_B - B @ X, X


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, g_A: torch.Tensor, g_B: torch.Tensor,
                        s: torch.Tensor | float) -> torch.Tensor:
    """``s (B g_A + g_B A)``: the k x d change of W per unit LoRA step."""
    return s * (B @ g_A + g_B @ A)


class _LoRAProBase(PairedOptimizer):
    _full = False

    def __init__(self, params: Any, lora_options: dict, *, weight_decay: float, ridge: float,
                 x_mode: str, **kwargs: Any) -> None:
        check_range("weight_decay", weight_decay, 0.0, None)
        check_range("ridge", ridge, 0.0, None)
        if x_mode not in ("sylvester", "zero"):
            raise ValueError(f"x_mode must be 'sylvester' or 'zero', got {x_mode!r}")
        lora_options.update(weight_decay=weight_decay, ridge=ridge, x_mode=x_mode)
        super().__init__(params, lora_options, **kwargs)

    def _states(self, bucket: PairBucket, dt: torch.dtype) -> list[dict]:
        """Per-pair state lives with A (skip counter; k x d moments for the AdamW version). B gets
        a counter too, which stays 0: checkpoint tools (torch.distributed.checkpoint) expect a
        state for every trainable tensor."""
        for A, B in zip(bucket.A, bucket.B):
            self.state[B].setdefault("nonfinite_skips", new_counter(B))
            st = self.state[A]
            if "nonfinite_skips" not in st:
                st["nonfinite_skips"] = new_counter(A)
            if self._full and "exp_avg" not in st:
                k, d = as_matrix(B).shape[0], as_matrix(A).shape[1]
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros(k, d, dtype=dt, device=A.device)
                st["exp_avg_sq"] = torch.zeros(k, d, dtype=dt, device=A.device)
        return [self.state[p] for p in bucket.A]

    def _read(self, group: dict) -> list[tuple]:
        work = []
        for bucket in self.pair_buckets(group, needs_grad="A"):
            dt = state_dtype_for(bucket.A[0], self.linalg_dtype)
            work.append((bucket, self._states(bucket, dt), stack_factor(bucket.A, "A", dt),
                         stack_factor(bucket.B, "B", dt).mT, stack_grad(bucket.A, "A", dt),
                         stack_grad(bucket.B, "B", dt).mT))
        return work

    def _compute(self, group: dict, work: tuple, clip: Clip) -> tuple:
        """Theorems 2.1-2.2 (:func:`lora_pro_gradients`); the AdamW version first runs Adam on the
        k x d equivalent gradient (its moments are updated in place: they are the big tensors)."""
        bucket, a_states, A, B, gA, gB = work
        ok = all_finite(gA, gB)
        gA, gB = mask_pairs(ok, gA, torch.zeros_like(gA)), mask_pairs(ok, gB, torch.zeros_like(gB))
        s = torch.tensor(bucket.scaling, dtype=A.dtype, device=A.device).view(-1, 1, 1)
        basis = gram_basis(A, B, group["ridge"])
        if self._full:
            g0A, g0B, _ = lora_pro_gradients(basis, A, B, gA, gB, 1 / s**2, solve_x=False)
            g_eq = equivalent_gradient(A, B, g0A, g0B, s)
            ok = ok & all_finite(g_eq)
            G_hat = self._adam(group, a_states, g_eq, ok)
            gA, gB = s * (B.mT @ G_hat), s * (G_hat @ A.mT)
        dA, dB, _ = lora_pro_gradients(basis, A, B, gA, gB, 1 / s**2, solve_x=group["x_mode"] == "sylvester")
        lr, wd = group["lr"], group["weight_decay"]
        A_new, B_new = A - lr * (dA + wd * A), B - lr * (dB + wd * B)
        ok = ok & all_finite(A_new, B_new)
        self._raise_if_nonfinite(group, bucket.index, ok, "factors A, B")
        return mask_pairs(ok, A_new, A), mask_pairs(ok, B_new, B), ok

    def _apply(self, group: dict, work: tuple, update: tuple) -> None:
        bucket, a_states = work[:2]
        A_new, B_new, ok = update
        write_factor(bucket.A, "A", A_new)
        write_factor(bucket.B, "B", B_new.mT)
        self._count_skips(a_states, ok)

    def _adam(self, group: dict, states: list[dict], g: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Adam on the k x d moments, in place (they are the big tensors): returns G^ (n, k, d).

        Pairs that are not ``ok`` keep their moments (their lerp weight is 0).
        """
        beta1, beta2 = group["betas"]
        t = advance_steps(states, g)
        keep = ok.to(g.dtype)
        g = mask_pairs(ok, g, torch.zeros_like(g))  # lerp with weight 0 would still spread a NaN
        M, V = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(M, list(g.unbind(0)), list(((1 - beta1) * keep).unbind(0)))
        torch._foreach_lerp_(V, list((g * g).unbind(0)), list(((1 - beta2) * keep).unbind(0)))
        denom = torch._foreach_div(V, list((1 - beta2**t).unbind(0)))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        G_hat = torch._foreach_div(M, list((1 - beta1**t).unbind(0)))
        torch._foreach_div_(G_hat, denom)
        return torch.stack(G_hat)


class LoRAProSGD(_LoRAProBase):
    r"""LoRA-Pro, SGD version: ``X <- X - lr (g_X + wd X)`` with Theorem 2.1/2.2 gradients.

    Args:
        params: an ``nn.Module`` or parameters / groups with ``model=`` or ``pairs=``.
        lr: learning rate (``group["lr"]`` each step; full-fine-tuning scale, e.g. 2e-5 .. 1e-2).
        weight_decay: decoupled decay on A and B.
        ridge: delta added to both Grams (official 1e-8).
        x_mode: ``"sylvester"`` (Theorem 2.2) or ``"zero"`` (X = 0).
        aux_*, on_nonfinite, linalg_dtype: see :class:`~altlora.optim.paired.PairedOptimizer`.
    """

    name = "lora_pro_sgd"
    description = "LoRA-Pro (SGD): tangent-space-projected full gradient step"

    lr_is_adam_scale = False  # aux_lr defaults to 1e-3, not lr

    def __init__(self, params: Any = None, lr: float = 1e-3, *, weight_decay: float = 0.0,
                 ridge: float = 1e-8, x_mode: str = "sylvester", **kwargs: Any) -> None:
        super().__init__(params, dict(lr=lr), weight_decay=weight_decay, ridge=ridge, x_mode=x_mode,
                         **kwargs)


class LoRAPro(_LoRAProBase):
    r"""LoRA-Pro, AdamW version ("full"): Adam moments of size k x d on the equivalent gradient.

    Memory: ``2 k d`` state floats per adapted layer (fp32 or better), e.g. 10.7 GB for
    Llama-3-8B q/k/v/o; that is the method, not an implementation choice.

    Args:
        lr: learning rate of the final SGD step (official recipe 2e-5 for 7B models).
        betas, eps: Adam coefficients on the k x d moments (bias-corrected with the true step).
        weight_decay, ridge, x_mode: as :class:`LoRAProSGD`.
    """

    name = "lora_pro"
    description = "LoRA-Pro (AdamW): Adam on the k x d equivalent gradient (2kd state), Sylvester-optimal X"

    _full = True

    def __init__(self, params: Any = None, lr: float = 2e-5, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, ridge: float = 1e-8,
                 x_mode: str = "sylvester", **kwargs: Any) -> None:
        check_betas("betas", betas)
        check_range("eps", eps, 0.0, None)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps), weight_decay=weight_decay,
                         ridge=ridge, x_mode=x_mode, **kwargs)
