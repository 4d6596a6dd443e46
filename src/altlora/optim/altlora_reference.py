"""Algorithms 1 and 2 of arXiv 2505.12455, transcribed as printed: one pair, float64, no batching.

Slow and literal on purpose: it is the specification that :class:`~altlora.optim.AltLoRA` and
:class:`~altlora.optim.AltLoRAPlus` are tested against, step by step (``tests/test_theory.py``).
Index semantics (reference §1.3): at step t the active factor is updated from the gradient at
the current point; the other factor's value at this factor's previous update (``B_prev``,
``A_prev``) defines the momentum's basis change (Theorem 2, Corollary 2).

    A-step:  g~ = (1/s^2) (B^T B + lam I)^-1 grad_A             (Theorem 1, Corollary 1)
             M~ = (B^T B + lam I)^-1 B^T B_prev M_A              (Theorem 2)
    B-step:  g~ = (1/s^2) grad_B (A A^T + lam I)^-1
             M~ = M_B A_prev A^T (A A^T + lam I)^-1
    both:    M <- b1 M~ + (1 - b1) g~
             Algorithm 1: X <- X - lr (M + wd X)
             Algorithm 2: V <- b2 V + (1 - b2) g~^2;  X <- X - lr (M / (sqrt(V) + eps) + wd X)

``max_grad_norm`` adds this library's clipping: every g~ of a step is scaled by
``min(1, c / N)``, N the Frobenius norm of the full-weight steps ``s B g~_A`` and ``s g~_B A``
(computed here from the k x d products themselves). ``relative_ridge`` rho makes lam
``ridge + rho * trace(Gram) / r`` for each Gram.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["altlora_reference"]


def altlora_reference(
    A0: torch.Tensor,
    B0: torch.Tensor,
    s: float,
    grad_W: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    *,
    plus: bool,
    lr: float,
    first: str = "A",
    switch_every: int = 1,
    mode: str = "alternating",
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ridge: float = 1e-6,
    relative_ridge: float = 0.0,
    max_grad_norm: float | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The iterates ``(A_t, B_t)``, t = 1 .. steps, of Algorithm 1 (``plus=False``) or 2.

    ``grad_W(A, B)`` returns the full gradient dL/dW at ``W = W0 + s B A``; the LoRA gradients
    are ``s B^T G`` and ``s G A^T`` (eq. 1).
    """
    A, B = A0.double().clone(), B0.double().clone()
    r = A.shape[0]
    I = torch.eye(r, dtype=A.dtype)
    M_A, M_B = torch.zeros_like(A), torch.zeros_like(B)
    V_A, V_B = torch.zeros_like(A), torch.zeros_like(B)
    B_prev, A_prev = torch.zeros_like(B), torch.zeros_like(A)  # the other factor at this one's last update
    second = {"A": "B", "B": "A"}[first]

    def regularised(gram: torch.Tensor) -> torch.Tensor:
        return gram + (ridge + relative_ridge * gram.trace() / r) * I

    iterates = []
    for t in range(steps):
        active = "AB" if mode == "joint" else (first if (t // switch_every) % 2 == 0 else second)
        G = grad_W(A, B).double()
        grad_A, grad_B = s * B.T @ G, s * G @ A.T
        K_A, K_B = regularised(B.T @ B), regularised(A @ A.T)  # the Grams of the A- and B-steps
        g_A = torch.linalg.solve(K_A, grad_A) / s**2 if "A" in active else None
        g_B = torch.linalg.solve(K_B, grad_B.T).T / s**2 if "B" in active else None
        if max_grad_norm:
            lifted = [(s * B @ g_A).norm() if g_A is not None else 0.0, (s * g_B @ A).norm() if g_B is not None else 0.0]
            coef = min(1.0, max_grad_norm / (sum(float(x) ** 2 for x in lifted) ** 0.5 + 1e-6))
            g_A = None if g_A is None else coef * g_A
            g_B = None if g_B is None else coef * g_B
        new_A, new_B = A, B
        if g_A is not None:
            M_tilde = torch.linalg.solve(K_A, B.T @ B_prev @ M_A)
            M_A = beta1 * M_tilde + (1 - beta1) * g_A
            V_A = beta2 * V_A + (1 - beta2) * g_A * g_A
            direction = M_A / (V_A.sqrt() + eps) if plus else M_A
            new_A = A - lr * (direction + weight_decay * A)
            B_prev = B
        if g_B is not None:
            M_tilde = torch.linalg.solve(K_B, (M_B @ A_prev @ A.T).T).T
            M_B = beta1 * M_tilde + (1 - beta1) * g_B
            V_B = beta2 * V_B + (1 - beta2) * g_B * g_B
            direction = M_B / (V_B.sqrt() + eps) if plus else M_B
            new_B = B - lr * (direction + weight_decay * B)
            A_prev = A
        A, B = new_A, new_B
        iterates.append((A.clone(), B.clone()))
    return iterates
