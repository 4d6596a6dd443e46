"""A LoRA problem whose full weight W is materialised, for exact float64 checks.

``loss(W) = mean((tanh(X W^T) - Y)^2)`` is non-linear in W, so the gradient re-evaluated
after a half-step differs from the one before it (which is what Algorithm 1 relies on).
"""

from __future__ import annotations

import torch

DT = torch.float64


class Problem:
    def __init__(self, k: int = 12, d: int = 10, r: int = 3, n: int = 40, seed: int = 0,
                 b_zero: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k, self.d, self.r = k, d, r
        self.W0 = torch.randn(k, d, generator=g, dtype=DT) / d**0.5
        self.X = torch.randn(n, d, generator=g, dtype=DT)
        self.Y = torch.randn(n, k, generator=g, dtype=DT)
        self.A0 = torch.randn(r, d, generator=g, dtype=DT) / d**0.5
        self.B0 = torch.zeros(k, r, dtype=DT) if b_zero else torch.randn(k, r, generator=g, dtype=DT) / r
        self.R = torch.randn(r, r, generator=g, dtype=DT) + 2 * torch.eye(r, dtype=DT)  # invertible

    def loss_of_W(self, W: torch.Tensor) -> torch.Tensor:
        return ((torch.tanh(self.X @ W.T) - self.Y) ** 2).mean()

    def W(self, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        return self.W0 + s * B @ A

    def full_grad(self, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        W = self.W(A, B, s).detach().requires_grad_(True)
        self.loss_of_W(W).backward()
        return W.grad

    def params(self, s: float = 2.0, transform: bool = False):
        A, B = self.A0.clone(), self.B0.clone()
        if transform:
            A, B = self.R @ A, B @ torch.linalg.inv(self.R)
        return torch.nn.Parameter(A), torch.nn.Parameter(B)

    def backward(self, A: torch.nn.Parameter, B: torch.nn.Parameter, s: float) -> float:
        A.grad = B.grad = None
        loss = self.loss_of_W(self.W(A, B, s))
        loss.backward()
        return loss.item()


def proj_col(B: torch.Tensor) -> torch.Tensor:
    """Proj_c(B) = B (B^T B)^-1 B^T (test oracle only; the library never forms it)."""
    return B @ torch.linalg.solve(B.T @ B, B.T)


def proj_row(A: torch.Tensor) -> torch.Tensor:
    """Proj_r(A) = A^T (A A^T)^-1 A."""
    return A.T @ torch.linalg.solve(A @ A.T, A)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
