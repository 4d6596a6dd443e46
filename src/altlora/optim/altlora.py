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

from typing import Any, Callable

import torch

from .paired import PairBucket, PairedOptimizer, _check_betas, _check_range, state_dtype_for
from .sharding import all_reduce_and, all_reduce_sum, layout_of, local_r_first, write_r_first

__all__ = ["AltLoRA", "AltLoRAPlus", "altlora_factor_update"]

_OTHER = {"A": "B", "B": "A"}
_CONVENTIONS = {
    # paper: Algorithms 1-2 as printed (1/s^2 scaled gradients, no bias correction)
    "paper": dict(divide_by_scaling_sq=True, bias_correction="none"),
    # released code (LucasXinYu/AltLoRA @ 94b2198): no 1/s^2, first-moment bias correction.
    # Use it to transfer the paper's published learning rates.
    "released_code": dict(divide_by_scaling_sq=False, bias_correction="first"),
}


def altlora_factor_update(
    X: torch.Tensor,
    grad: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor | None,
    *,
    inv_s2: torch.Tensor | float,
    lr: float,
    beta1: float,
    beta2: float = 0.0,
    eps: float = 0.0,
    weight_decay: float = 0.0,
    ridge: float = 1e-6,
    bc1: float = 1.0,
    bc2: float = 1.0,
    sync_ok: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One AltLoRA / AltLoRA+ half-step on a batch of factors (pure function).

    Args:
        X: active factors, rank-first, shape (n, r, m) (m may be a column shard).
        grad: their LoRA gradients, same shape.
        gram: ``Y Y^T`` of the other factors (n, r, r), without the ridge.
        cross: ``Y Y_prev^T`` (n, r, r), the basis change since the momentum was stored.
        exp_avg: stored first moments M (n, r, m), in the ``Y_prev`` basis.
        exp_avg_sq: second moments V for AltLoRA+, or None for AltLoRA.
        inv_s2: ``1/s^2`` per pair, shape (n, 1, 1) or a number.
        sync_ok: combines the per-pair "update is valid" flags across column shards.

    Returns ``(X_new, M_new, V_new, ok)``; pairs with ``ok == False`` (non-finite gradient or
    update, or a Gram that is not positive definite) are returned unchanged.
    """
    r = X.shape[-2]
    eye = torch.eye(r, dtype=X.dtype, device=X.device)
    L, info = torch.linalg.cholesky_ex(gram + ridge * eye)
    ok = (info == 0) & torch.isfinite(grad).flatten(1).all(1)
    g = torch.where(ok[:, None, None], grad, 0.0)
    carried = cross @ exp_avg
    if exp_avg_sq is None:
        M = torch.cholesky_solve(beta1 * carried + (1 - beta1) * inv_s2 * g, L)
        direction = M / bc1
        V = None
    else:
        m = X.shape[-1]
        M_proj, g_scaled = torch.cholesky_solve(torch.cat([carried, inv_s2 * g], -1), L).split(m, -1)
        M = beta1 * M_proj + (1 - beta1) * g_scaled
        V = beta2 * exp_avg_sq + (1 - beta2) * g_scaled.square()
        direction = (M / bc1) / ((V / bc2).sqrt() + eps)
    X_new = X - lr * (direction + weight_decay * X)
    ok = ok & torch.isfinite(X_new).flatten(1).all(1)
    if sync_ok is not None:
        ok = sync_ok(ok)
    mask = ok[:, None, None]
    X_new = torch.where(mask, X_new, X)
    M = torch.where(mask, M, exp_avg)
    if V is not None:
        V = torch.where(mask, V, exp_avg_sq)
    return X_new, M, V, ok


class _AltLoRABase(PairedOptimizer):
    """Shared implementation; see :class:`AltLoRA` and :class:`AltLoRAPlus`."""

    _second_moment = False

    def __init__(self, params: Any, lora_options: dict, *, switch_every: int, first: str,
                 mode: str, convention: str, divide_by_scaling_sq: bool | None,
                 bias_correction: str | bool | None, weight_decay: float, ridge: float,
                 **kwargs: Any) -> None:
        if not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"switch_every must be an integer >= 1, got {switch_every!r}")
        if first not in ("A", "B"):
            raise ValueError(f"first must be 'A' or 'B', got {first!r}")
        if mode not in ("alternating", "joint"):
            raise ValueError(f"mode must be 'alternating' or 'joint', got {mode!r}")
        if convention not in _CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(_CONVENTIONS)}, got {convention!r}")
        _check_range("weight_decay", weight_decay, 0.0, None)
        _check_range("ridge", ridge, 0.0, None)
        preset = _CONVENTIONS[convention]
        if divide_by_scaling_sq is None:
            divide_by_scaling_sq = preset["divide_by_scaling_sq"]
        if bias_correction is None:
            bias_correction = preset["bias_correction"]
        bias_correction = {True: "both", False: "none"}.get(bias_correction, bias_correction)
        if bias_correction not in ("none", "first", "both"):
            raise ValueError(f"bias_correction must be 'none', 'first' or 'both', got {bias_correction!r}")
        lora_options.update(
            weight_decay=weight_decay, ridge=ridge, switch_every=switch_every, first=first,
            mode=mode, divide_by_scaling_sq=bool(divide_by_scaling_sq),
            bias_correction=bias_correction,
        )
        super().__init__(params, lora_options, **kwargs)

    # ---------------------------------------------------------------- schedule
    @staticmethod
    def _active(group: dict, t: int) -> tuple[str, ...]:
        if group["mode"] == "joint":
            return ("A", "B")
        block = t // group["switch_every"]
        return (group["first"],) if block % 2 == 0 else (_OTHER[group["first"]],)

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
        return "".join(self._active(group, group["step"]))

    def _moments(self, group: dict) -> tuple[float, float, float]:
        raise NotImplementedError

    # ---------------------------------------------------------------- step
    def _lora_step(self, group: dict) -> None:
        t = group["step"]
        every = 1 if group["mode"] == "joint" else group["switch_every"]
        phase_first, phase_last = t % every == 0, (t + 1) % every == 0
        # Compute every update before applying any: the joint mode is a Jacobi update.
        pending = [
            self._factor_update(group, bucket, factor, t, phase_first, phase_last)
            for factor in self._active(group, t)
            for bucket in self.pair_buckets(group, needs_grad=factor)
        ]
        for apply in pending:
            apply()

    def _state(self, p: torch.Tensor, shape: torch.Size, dt: torch.dtype) -> dict:
        st = self.state[p]
        if not st:
            dev = p.device
            st["exp_avg"] = torch.zeros(shape, dtype=dt, device=dev)
            if self._second_moment:
                st["exp_avg_sq"] = torch.zeros(shape, dtype=dt, device=dev)
            st["basis_cross"] = torch.zeros(shape[0], shape[0], dtype=dt, device=dev)
            st["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=dev)
        return st

    def _factor_update(self, group: dict, bucket: PairBucket, factor: str, t: int,
                       phase_first: bool, phase_last: bool):
        other = _OTHER[factor]
        xs, ys = bucket.factor(factor), bucket.other(factor)
        x_lay, y_lay = layout_of(xs[0], factor), layout_of(ys[0], other)
        dt = state_dtype_for(xs[0], self.linalg_dtype)

        X = torch.stack([local_r_first(p, factor, x_lay) for p in xs]).to(dt)
        G = torch.stack([local_r_first(p.grad, factor, x_lay) for p in xs]).to(dt)
        Y = torch.stack([local_r_first(q, other, y_lay) for q in ys]).to(dt)
        x_states = [self._state(p, X.shape[1:], dt) for p in xs]
        y_states = [self._state(q, Y.shape[1:], dt) for q in ys]
        gram = all_reduce_sum(Y @ Y.mT, y_lay)
        # At a phase's first step the other factor has moved since this factor's last update:
        # use the stored basis change; otherwise Y_prev = Y and the change is the Gram itself.
        cross = torch.stack([s["basis_cross"] for s in y_states]).to(dt) if phase_first else gram
        M = torch.stack([s["exp_avg"] for s in x_states]).to(dt)
        V = torch.stack([s["exp_avg_sq"] for s in x_states]).to(dt) if self._second_moment else None

        if group["divide_by_scaling_sq"]:
            inv_s2 = torch.tensor([1.0 / s**2 for s in bucket.scaling], dtype=dt, device=X.device)
            inv_s2 = inv_s2.view(-1, 1, 1)
        else:
            inv_s2 = 1.0
        beta1, beta2, eps = self._moments(group)
        n_updates = self._update_count(group, factor, t)
        bc = group["bias_correction"]
        bc1 = 1 - beta1**n_updates if bc in ("first", "both") else 1.0
        bc2 = 1 - beta2**n_updates if bc == "both" and self._second_moment else 1.0

        X_new, M_new, V_new, ok = altlora_factor_update(
            X, G, gram, cross, M, V, inv_s2=inv_s2, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=group["weight_decay"], ridge=group["ridge"], bc1=bc1, bc2=bc2,
            sync_ok=lambda flags: all_reduce_and(flags, x_lay),
        )
        if self.on_nonfinite == "raise" and not bool(ok.all()):
            bad = [group["pair_names"][bucket.index[i]] for i in (~ok).nonzero().flatten().tolist()]
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient or update for factor {factor} of "
                f"LoRA pair(s) {bad} at step {t}. Lower the learning rate or enable gradient "
                "clipping; on_nonfinite='skip' skips such pairs instead."
            )

        # Basis change r x r that the *other* factor's momentum will need (Thm 2): X_new X_start^T.
        cross_out = start_snapshot = None
        if phase_last:
            starts = [s.pop("phase_start", None) for s in x_states]
            start = X if any(s is None for s in starts) else torch.stack(starts)
            cross_out = all_reduce_sum(X_new @ start.mT, x_lay)
        elif phase_first:
            start_snapshot = X

        def apply() -> None:
            write_r_first(xs, factor, x_lay, list(X_new.unbind(0)))
            torch._foreach_copy_([s["exp_avg"] for s in x_states], list(M_new.unbind(0)))
            if V_new is not None:
                torch._foreach_copy_([s["exp_avg_sq"] for s in x_states], list(V_new.unbind(0)))
            if cross_out is not None:
                torch._foreach_copy_([s["basis_cross"] for s in x_states], list(cross_out.unbind(0)))
            if start_snapshot is not None:
                for s, snap in zip(x_states, start_snapshot.unbind(0)):
                    s["phase_start"] = snap.clone()
            torch._foreach_add_([s["nonfinite_skips"] for s in x_states], list((~ok).unbind(0)))

        return apply


class AltLoRA(_AltLoRABase):
    r"""AltLoRA (Algorithm 1): alternating projected-gradient steps with projected momentum.

    Each ``step()`` updates one factor of every LoRA pair (A first by default), using the
    least-squares-optimal scaled gradient ``(1/s^2)(B^T B + lam I)^-1 grad_A`` (Theorem 1,
    Corollary 1) or ``(1/s^2) grad_B (A A^T + lam I)^-1``, and heavy-ball momentum that is
    re-projected onto the new subspace whenever the other factor moved (Theorem 2,
    Corollary 2). Weight decay enters as ``lr * (M + weight_decay * X)``. Other trainable
    tensors (heads, biases, DoRA magnitudes) are updated by AdamW inside this optimizer.

    Args:
        params: an ``nn.Module`` (its LoRA pairs are found by structure), or parameters /
            param groups together with ``model=`` or ``pairs=``.
        lr: learning rate (read from ``group["lr"]`` every step, so schedulers work).
        beta1: momentum coefficient (paper default 0.9).
        weight_decay: gamma of Algorithm 1, applied to the LoRA factors.
        ridge: lambda added to the r x r Grams (Corollaries 1-2; paper 1e-6).
        switch_every: optimizer steps per phase (1 = the paper's strict alternation).
        first: ``"A"`` (Algorithm 1) or ``"B"`` (the paper's better ablation under PEFT init).
        mode: ``"alternating"`` or ``"joint"`` (both factors every step from the same
            gradient: the Table 9 joint ablation).
        convention: ``"paper"`` or ``"released_code"`` (no 1/s^2 and first-moment bias
            correction, as the authors' code; use it to reuse their learning rates).
        divide_by_scaling_sq, bias_correction: override the convention's choices;
            ``bias_correction`` is ``"none"``, ``"first"`` or ``"both"``.
        model, pairs: where the LoRA pairs come from (``pairs`` accepts ``LoRAPair`` or
            ``(A, B, scaling[, name])`` tuples for non-PEFT models).
        aux_lr, aux_betas, aux_eps, aux_weight_decay: AdamW options for non-LoRA tensors.
        on_nonfinite: ``"skip"`` (skip and count the pair for that step) or ``"raise"``.
        linalg_dtype: ``torch.float64`` to do state and r x r algebra in double precision.
    """

    def __init__(self, params: Any = None, lr: float = 1e-3, *, beta1: float = 0.9,
                 weight_decay: float = 0.0, ridge: float = 1e-6, switch_every: int = 1,
                 first: str = "A", mode: str = "alternating", convention: str = "paper",
                 divide_by_scaling_sq: bool | None = None,
                 bias_correction: str | bool | None = None, **kwargs: Any) -> None:
        _check_range("beta1", beta1, 0.0, 1.0)
        super().__init__(params, dict(lr=lr, beta1=beta1), switch_every=switch_every,
                         first=first, mode=mode, convention=convention,
                         divide_by_scaling_sq=divide_by_scaling_sq,
                         bias_correction=bias_correction, weight_decay=weight_decay,
                         ridge=ridge, **kwargs)

    def _moments(self, group: dict) -> tuple[float, float, float]:
        return group["beta1"], 0.0, 0.0


class AltLoRAPlus(_AltLoRABase):
    r"""AltLoRA+ (Algorithm 2): AltLoRA plus an Adam-style second moment.

    The stored first moment is the *projected* one (as in the paper, unlike the released
    code); the second moment is the EMA of the squared scaled gradient and is not projected;
    ``eps`` is added outside the square root; no bias correction unless asked for.
    Arguments are those of :class:`AltLoRA` with ``betas=(beta1, beta2)`` and ``eps``.
    """

    _second_moment = True

    def __init__(self, params: Any = None, lr: float = 1e-4, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, ridge: float = 1e-6,
                 switch_every: int = 1, first: str = "A", mode: str = "alternating",
                 convention: str = "paper", divide_by_scaling_sq: bool | None = None,
                 bias_correction: str | bool | None = None, **kwargs: Any) -> None:
        _check_betas("betas", betas)
        _check_range("eps", eps, 0.0, None)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps),
                         switch_every=switch_every, first=first, mode=mode,
                         convention=convention, divide_by_scaling_sq=divide_by_scaling_sq,
                         bias_correction=bias_correction, weight_decay=weight_decay,
                         ridge=ridge, **kwargs)

    def _moments(self, group: dict) -> tuple[float, float, float]:
        beta1, beta2 = group["betas"]
        return beta1, beta2, group["eps"]
