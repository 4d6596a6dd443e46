"""LoRA-RITE (Yen et al., "LoRA Done RITE", ICLR 2025): transformation-invariant adaptive LoRA.

Notation: ``X_A = A^T`` (d x r) and ``X_B = B`` (k x r), so ``W = W0 + s X_B X_A^T``; gradients
``G_A = grad_A^T`` and ``G_B = grad_B``. Each factor's statistics live in the orthonormal basis
of the *other* factor. One step, for factor A (B is symmetric, with the roles swapped):

1. ``X_A = U_A R_A``, ``X_B = U_B R_B`` (reduced QR; ``R^+`` a pseudo-inverse, 0 for a zero factor).
2. Unmagnified gradient ``Gbar_A = G_A R_B^+`` (= ``s G^T U_B``): independent of how W is
   split into factors. Update skipping: ``Gbar_A <- 0`` if ``RMS(Gbar_A) > update_skipping``.
3. Global clipping: if ``c = clip_unmagnified_grad > 0`` and ``n = sqrt(sum ||Gbar||^2) > c``
   (over every factor of every pair), ``Gbar <- Gbar c / n``.
4. Basis transport ``P_A = U_B^T U_B,old`` (r x r; 0 at the first step),
   ``V~ = sym(P_A V_A P_A^T)``.
5. Escape mass (``apply_escape``): ``d = min(max(0, max_i[l_i(V_A) - l_i(V~)]), max(0, tr V_A - tr V~))``,
   ``rho_A <- b2^(t) (rho_A + d)``; otherwise ``rho_A = 0``.
6. ``V_A <- sym((1 - b2^) Gbar_A^T Gbar_A / d + b2^ V~)``; with ``V_A = Q diag(w) Q^T`` (w clamped
   at 0, unlike the public port whose negative eigenvalues silently zero the update),
   ``Sbar_A = Gbar_A Q diag(1 / (sqrt(w + rho_A) + eps)) Q^T``.
7. ``M_A <- (1 - b1^) Sbar_A + b1^ M_A P_A^T``; update capping
   ``N_A = M_A / max(1, RMS(M_A) / update_capping)`` (when > 0).
8. ``X_A <- X_A - lr (N_A (R_B^+)^T + wd X_A)``; the change of W is ``-lr s U_B N_A^T``.
9. Balance (``balance_param``): rescale both new factors to the geometric mean of their norms.

``b^(t) = b (1 - b^t) / (1 - b^(t+1))`` is the Adafactor bias-corrected decay (0 at t = 0).
State per factor, tensors only and created lazily per parameter (no global "initialised" flag,
so a loaded state is continued, not reset): ``exp_avg`` (m x r), ``exp_avg_sq`` (r x r),
``escape`` (0-d), ``basis`` (the factor's own ``U`` before the step, m x r), ``step``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..validate import check_betas, check_range
from ._batched import (advance_steps, all_finite, eigh_psd, mask_pairs, new_counter, stack_factor, stack_grad,
                       sym, write_factor)
from .paired import Clip, PairBucket, PairedOptimizer, r_first, state_dtype_for

__all__ = ["LoRARite", "rite_factor_update"]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().flatten(1).mean(1).sqrt().view(-1, 1, 1)


def rite_factor_update(
    Gbar: torch.Tensor, X: torch.Tensor, U_other: torch.Tensor, U_other_old: torch.Tensor,
    R_other_pinv: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, escape: torch.Tensor,
    *, beta1: torch.Tensor, beta2: torch.Tensor, lr: float, eps: float, weight_decay: float,
    apply_escape: bool, update_capping: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 4-8 for a batch of one factor kind (column form, shapes (n, m, r)).

    ``beta1``/``beta2`` are the bias-corrected decays per pair, shape (n, 1, 1).
    Returns ``(X_new, exp_avg, exp_avg_sq, escape)``.
    """
    m = Gbar.shape[-2]
    P = U_other.mT @ U_other_old
    V_t = sym(P @ exp_avg_sq @ P.mT)
    if apply_escape:
        lost_eig = (torch.linalg.eigvalsh(sym(exp_avg_sq)) - torch.linalg.eigvalsh(V_t)).amax(-1).clamp_min(0)
        lost_tr = (exp_avg_sq.diagonal(dim1=-2, dim2=-1).sum(-1)
                   - V_t.diagonal(dim1=-2, dim2=-1).sum(-1)).clamp_min(0)
        escape = beta2.view(-1) * (escape + torch.minimum(lost_eig, lost_tr))
    else:
        escape = torch.zeros_like(escape)
    V = sym((1 - beta2) * (Gbar.mT @ Gbar) / m + beta2 * V_t)
    w, Q = eigh_psd(V)
    inv_root = 1.0 / ((w + escape.view(-1, 1)).sqrt() + eps)
    S = Gbar @ sym((Q * inv_root.unsqueeze(-2)) @ Q.mT)
    M = (1 - beta1) * S + beta1 * (exp_avg @ P.mT)
    N = M / (_rms(M) / update_capping).clamp_min(1.0) if update_capping > 0 else M
    X_new = X - lr * (N @ R_other_pinv.mT + weight_decay * X)
    return X_new, M, V, escape


class LoRARite(PairedOptimizer):
    r"""LoRA-RITE: adaptive, transformation-invariant LoRA optimizer (unmagnified gradients,
    basis-transported moments, escape mass, update capping and skipping).

    Defaults are the AltLoRA paper's LoRA-RITE baseline (escape on, capping 1.0, skipping 5.0,
    balance on, unmagnified clipping 1.0, eps 1e-6); the author's port defaults are
    ``apply_escape=False, update_capping=0, update_skipping=1.0, balance_param=False``.
    Disable the trainer's own gradient clipping (``max_grad_norm=0``): RITE clips the
    unmagnified gradients globally itself.

    Args:
        params: an ``nn.Module`` or parameters / groups with ``model=`` or ``pairs=``.
        lr: learning rate (``group["lr"]`` each step).
        betas: decays of the first and second moment (bias-corrected Adafactor style).
        eps: added to ``sqrt(eigenvalue)``.
        weight_decay: decoupled decay on the factors (not preconditioned).
        clip_unmagnified_grad: global clip of the unmagnified gradients (0 = off).
        update_capping: cap on ``RMS(M)`` of the unmagnified update (0 = off).
        update_skipping: zero a factor's unmagnified gradient whose RMS exceeds it (0 = off).
        apply_escape: add the second-moment mass lost by the basis change (escape mass).
        balance_param: equalise ``||A||_F`` and ``||B||_F`` after each step (product unchanged).
        aux_*, on_nonfinite, linalg_dtype: see :class:`~altlora.optim.paired.PairedOptimizer`.
    """

    name = "lora_rite"
    description = "LoRA-RITE: transformation-invariant adaptive moments in the factors' bases"

    def __init__(self, params: Any = None, lr: float = 1e-4, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, clip_unmagnified_grad: float = 1.0,
                 update_capping: float = 1.0, update_skipping: float = 5.0, apply_escape: bool = True,
                 balance_param: bool = True, **kwargs: Any) -> None:
        check_betas("betas", betas)
        for name, v in (("eps", eps), ("weight_decay", weight_decay),
                        ("clip_unmagnified_grad", clip_unmagnified_grad),
                        ("update_capping", update_capping), ("update_skipping", update_skipping)):
            check_range(name, v, 0.0, None)
        super().__init__(params, dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            clip_unmagnified_grad=clip_unmagnified_grad, update_capping=update_capping,
            update_skipping=update_skipping, apply_escape=bool(apply_escape),
            balance_param=bool(balance_param)), **kwargs)

    # ------------------------------------------------------------------ state
    def _state(self, p: torch.Tensor, factor: str, dt: torch.dtype) -> dict:
        st = self.state[p]
        if not st:
            r, m = r_first(p, factor).shape
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros(m, r, dtype=dt, device=p.device)
            st["exp_avg_sq"] = torch.zeros(r, r, dtype=dt, device=p.device)
            st["escape"] = torch.zeros((), dtype=dt, device=p.device)
            st["basis"] = torch.zeros(m, r, dtype=dt, device=p.device)
            st["nonfinite_skips"] = new_counter(p)
        return st

    # ------------------------------------------------------------------ stepping
    def _unmagnify(self, group: dict, bucket: PairBucket) -> dict:
        """Steps 1-2 for one bucket (column form)."""
        dt = state_dtype_for(bucket.A[0], self.linalg_dtype)
        X = {"A": stack_factor(bucket.A, "A", dt).mT, "B": stack_factor(bucket.B, "B", dt).mT}
        G = {"A": stack_grad(bucket.A, "A", dt).mT, "B": stack_grad(bucket.B, "B", dt).mT}
        ok = all_finite(G["A"], G["B"])
        U, Rp = {}, {}
        for f in ("A", "B"):
            U[f], R = torch.linalg.qr(X[f])
            Rp[f] = torch.linalg.pinv(R)
        Gbar = {"A": G["A"] @ Rp["B"], "B": G["B"] @ Rp["A"]}
        skip = group["update_skipping"]
        for f in ("A", "B"):
            g = mask_pairs(ok, Gbar[f], torch.zeros_like(Gbar[f]))
            Gbar[f] = torch.where(_rms(g) > skip, 0.0, g) if skip > 0 else g
        return dict(dt=dt, X=X, U=U, Rp=Rp, Gbar=Gbar, ok=ok)

    def _read(self, group: dict) -> list[tuple[PairBucket, dict]]:
        return [(bucket, self._unmagnify(group, bucket)) for bucket in self.pair_buckets(group, needs_grad="A")]

    def _clip(self, reads: list[tuple[dict, list]]) -> Clip:
        """The global norm of the unmagnified gradients over every pair (each group clips at its
        ``clip_unmagnified_grad``)."""
        sq = [w["Gbar"][f].square().sum() for _, items in reads for _, w in items for f in ("A", "B")]
        return Clip(norm=torch.stack(sq).sum().sqrt() if sq else None)

    def _compute(self, group: dict, work: tuple[PairBucket, dict], clip: Clip) -> tuple:
        bucket, w = work
        dt, X, U, Rp, Gbar, ok = (w[k] for k in ("dt", "X", "U", "Rp", "Gbar", "ok"))
        c = group["clip_unmagnified_grad"]
        scale = (c / clip.norm.clamp_min(c)).to(dt) if c > 0 else 1.0
        states = {"A": [self._state(p, "A", dt) for p in bucket.A],
                  "B": [self._state(p, "B", dt) for p in bucket.B]}
        b1, b2 = group["betas"]
        t = advance_steps(states["A"] + states["B"], X["A"])[: len(bucket.A)] - 1  # same count for A and B
        hat = [b * (1 - b**t) / (1 - b ** (t + 1)) for b in (b1, b2)]
        new = {}
        for f, o in (("A", "B"), ("B", "A")):
            stacked = {k: torch.stack([st[k] for st in states[f]]) for k in ("exp_avg", "exp_avg_sq", "escape")}
            U_old = torch.stack([st["basis"] for st in states[o]])
            new[f] = rite_factor_update(
                scale * Gbar[f], X[f], U[o], U_old, Rp[o], stacked["exp_avg"], stacked["exp_avg_sq"],
                stacked["escape"], beta1=hat[0], beta2=hat[1], lr=group["lr"], eps=group["eps"],
                weight_decay=group["weight_decay"], apply_escape=group["apply_escape"],
                update_capping=group["update_capping"]) + (stacked,)
        XA, XB = new["A"][0], new["B"][0]
        if group["balance_param"]:
            nA = XA.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-6
            nB = XB.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-6
            mean = (nA * nB).sqrt()
            XA, XB = XA * (mean / nA), XB * (mean / nB)
        ok = ok & all_finite(XA, XB)
        self._raise_if_nonfinite(group, bucket.index, ok, "factors A, B")
        return states, new, XA, XB, ok

    def _apply(self, group: dict, work: tuple[PairBucket, dict], update: tuple) -> None:
        (bucket, w), (states, new, XA, XB, ok) = work, update
        X, U = w["X"], w["U"]
        write_factor(bucket.A, "A", mask_pairs(ok, XA, X["A"]).mT)
        write_factor(bucket.B, "B", mask_pairs(ok, XB, X["B"]).mT)
        for f in ("A", "B"):
            _, M, V, rho, old = new[f]
            sts = states[f]
            for key, val in (("exp_avg", M), ("exp_avg_sq", V), ("escape", rho)):
                torch._foreach_copy_([st[key] for st in sts], list(mask_pairs(ok, val, old[key]).unbind(0)))
            old_basis = torch.stack([st["basis"] for st in sts])
            torch._foreach_copy_([st["basis"] for st in sts], list(mask_pairs(ok, U[f], old_basis).unbind(0)))
        self._count_skips(states["A"], ok)
