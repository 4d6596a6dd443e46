"""Base class for optimizers that treat LoRA factors as pairs.

Structure lives in ``param_groups``: a *LoRA group* holds ``[A1, B1, A2, B2, ...]`` (built
from model structure, so the order is known, not assumed) plus plain-Python metadata
(``pair_names``, ``scaling``, ``step``); an *aux group* holds every other trainable tensor and
is updated with AdamW inside the same optimizer. Tensors are always read from
``group["params"]`` at step time, so frameworks that swap them in place (accelerate's FSDP2
preparation) and ``state_dict`` round trips keep working.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..pairing import LoRAPair, LoRAPairingError, as_matrix, as_pairs, find_lora_pairs, no_pairs_message
from ..validate import check_betas, check_range
from .adamw import adamw_update
from .sharding import full, r_first

__all__ = ["PairedOptimizer", "PairBucket", "Clip", "r_first", "check_not_flattened"]

_DEEPSPEED_MSG = (
    "{what}: the parameters look flattened or partitioned by DeepSpeed ZeRO, so the optimizer "
    "cannot see the (A, B) matrices. Matrix-aware LoRA optimizers are unsupported under "
    "DeepSpeed ZeRO; use DDP (torchrun / accelerate launch) or FSDP2 (fully_shard) instead, "
    "or DeepSpeed without ZeRO partitioning of the LoRA parameters."
)
_NO_GRAD_MSG = (
    "{what}.step(): no LoRA factor in the optimizer has a gradient, so none is updated. If the "
    "model was sharded with FSDP2's fully_shard after the optimizer was built, the optimizer "
    "holds the replaced tensors: build it after fully_shard (accelerate swaps them itself)."
)


def check_not_flattened(params: Iterable[torch.Tensor], what: str) -> None:
    for p in params:
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            raise LoRAPairingError(_DEEPSPEED_MSG.format(what=what))


def state_dtype_for(p: torch.Tensor, linalg_dtype: torch.dtype | None) -> torch.dtype:
    """Optimizer state precision: at least float32, float64 if params or linalg ask for it."""
    dt = torch.promote_types(p.dtype, torch.float32)
    if linalg_dtype is not None:
        dt = torch.promote_types(dt, linalg_dtype)
    return dt


@dataclass
class PairBucket:
    """Pairs of one LoRA group with identical shapes, dtype and device, stepped as a batch."""

    index: list[int]  # positions of the pairs inside the group
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scaling: list[float]

    def factor(self, which: str) -> list[torch.Tensor]:
        return self.A if which == "A" else self.B

    def other(self, which: str) -> list[torch.Tensor]:
        return self.B if which == "A" else self.A


@dataclass
class Clip:
    """What an optimizer that clips measured before this step: ``norm``, the global gradient norm
    in its own geometry, and ``coef``, the factor its gradients (and the AdamW tensors' gradients)
    are scaled by (None: not clipped)."""

    norm: torch.Tensor | None = None
    coef: torch.Tensor | None = None


def _pair_label(pr: LoRAPair, i: int) -> str:
    base = pr.name or f"pair{i}"
    return f"{base}[{pr.adapter}]" if pr.adapter else base


def _param_names(model: nn.Module | None) -> dict[int, str]:
    return {} if model is None else {id(p): n for n, p in model.named_parameters()}


def _normalise_groups(params: Any) -> list[dict]:
    """Turn tensors, (name, tensor) tuples or dict groups into a list of dict groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or dicts, not a single tensor")
    items = list(params)
    if not items:
        return []
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for g in items:
        g = dict(g)
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        names = g.pop("param_names", None)
        if ps and isinstance(ps[0], tuple):
            names, ps = [n for n, _ in ps], [p for _, p in ps]
        g["params"], g["_names"] = ps, names
        groups.append(g)
    return groups


def build_param_groups(
    params: Any,
    model: nn.Module | None,
    pairs: list[LoRAPair],
    lora_options: dict,
    aux_options: dict,
) -> tuple[list[dict], list[list[LoRAPair] | None]]:
    """Split user parameters into LoRA pair groups and AdamW aux groups.

    Each user group yields at most one LoRA group (pairs whose two factors it holds, with the
    user group's options) and one aux group (its remaining tensors, AdamW with ``aux_options``
    unless the user group overrides ``lr``).
    """
    names = _param_names(model)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        params += [t for pr in pairs for t in (pr.A, pr.B) if all(t is not q for q in params)]
    user_groups = _normalise_groups(params)
    pair_of = {}
    for pr in pairs:
        pair_of[id(pr.A)] = pr
        pair_of[id(pr.B)] = pr

    groups, sources = [], []
    for ug in user_groups:
        ps, given = ug.pop("params"), ug.pop("_names")
        local_names = {id(p): n for p, n in zip(ps, given)} if given else {}
        member = {id(p) for p in ps}
        group_pairs, aux = [], []
        for p in ps:
            pr = pair_of.get(id(p))
            if pr is None:
                aux.append(p)
                continue
            if id(pr.A) not in member or id(pr.B) not in member:
                raise LoRAPairingError(
                    f"{pr.name}: the A and B factors of this LoRA pair are in different param "
                    "groups; put both factors of a pair in the same group."
                )
            if p is pr.A:
                group_pairs.append(pr)

        def name_of(p, fallback):
            return local_names.get(id(p)) or names.get(id(p)) or fallback

        if group_pairs:
            lora_group = {**lora_options, **ug}
            lora_group.update(
                params=[t for pr in group_pairs for t in (pr.A, pr.B)],
                param_names=[
                    n for i, pr in enumerate(group_pairs)
                    for n in (name_of(pr.A, pr.a_name or f"{pr.name or i}.A"),
                              name_of(pr.B, pr.b_name or f"{pr.name or i}.B"))
                ],
                lora=True,
                pair_names=[_pair_label(pr, i) for i, pr in enumerate(group_pairs)],
                shapes=[list(t.shape) for pr in group_pairs for t in (pr.A, pr.B)],  # checked on load
                scaling=[pr.current_scaling() for pr in group_pairs],
                step=0,
            )
            groups.append(lora_group)
            sources.append(group_pairs)
        if aux:
            aux_group = {**aux_options, **{k: v for k, v in ug.items() if k == "lr"}}
            aux_group.update(
                params=aux,
                param_names=[name_of(p, f"param{len(groups)}.{i}") for i, p in enumerate(aux)],
                lora=False,
            )
            groups.append(aux_group)
            sources.append(None)
    return groups, sources


class PairedOptimizer(torch.optim.Optimizer):
    """Common machinery: pairing, aux AdamW group, batching, state precision, diagnostics.

    Subclasses define the stages of :meth:`step`: :meth:`_read`, :meth:`_compute`, :meth:`_apply`
    (and :meth:`_clip` if they clip).
    """

    #: Does ``lr`` live on Adam's per-entry scale? Optimizers whose LoRA step is an unnormalised
    #: (projected) gradient step in weight space set False: their lr (0.1-10) must not reach the
    #: AdamW-trained extra tensors, whose ``aux_lr`` then defaults to AdamW's 1e-3 instead of lr.
    lr_is_adam_scale: bool = True
    max_grad_norm: float | None = None  # set by optimizers that clip their own gradients
    last_grad_norm: torch.Tensor | None = None  # the last step's norm and clip coefficient
    last_clip_coef: torch.Tensor | None = None

    def __init__(
        self,
        params: Any,
        lora_options: dict,
        *,
        model: nn.Module | None = None,
        pairs: Iterable | None = None,
        aux_lr: float | None = None,
        aux_betas: tuple[float, float] = (0.9, 0.999),
        aux_eps: float = 1e-8,
        aux_weight_decay: float = 0.0,
        on_nonfinite: str = "skip",
        linalg_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("pass the model either positionally or as model=, not both")
            model, params = params, None
        # torch.compile(model) wraps it: pair and name through the original module (same
        # tensors), so names and checkpoints match the uncompiled model's
        model = getattr(model, "_orig_mod", model)
        lr = lora_options["lr"]
        check_range("lr", lr, 0.0, None)
        if aux_lr is None:
            aux_lr = lr if self.lr_is_adam_scale else 1e-3
        check_range("aux_lr", aux_lr, 0.0, None)
        check_betas("aux_betas", aux_betas)
        check_range("aux_eps", aux_eps, 0.0, None)
        check_range("aux_weight_decay", aux_weight_decay, 0.0, None)
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if linalg_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"linalg_dtype must be None, torch.float32 or torch.float64, got {linalg_dtype}")

        if pairs is not None:
            pair_list = as_pairs(pairs)
        elif model is not None:
            pair_list = find_lora_pairs(model)
        else:
            raise LoRAPairingError(
                f"{type(self).__name__} needs to know which tensors form LoRA pairs, and parameters "
                "alone do not say (pairing by their order would be a guess): pass the model or LoRA "
                "network as well, e.g. AltLoRA(param_groups, model=network, lr=...), or "
                "pairs=[(A, B, scaling), ...]. Trainer scripts that build the optimizer from parameters "
                "only (kohya's --optimizer_type module.Class) need that one argument added where they "
                "build it; see docs/integrations.md."
            )
        if params is not None and not isinstance(params, (list, tuple)):
            params = list(params)
        if not pair_list:
            raise LoRAPairingError(no_pairs_message(model))

        aux_options = dict(lr=aux_lr, betas=tuple(aux_betas),
                           eps=aux_eps, weight_decay=aux_weight_decay)
        groups, sources = build_param_groups(params, model, pair_list, lora_options, aux_options)
        check_not_flattened((p for g in groups for p in g["params"]), type(self).__name__)
        if not any(g["lora"] for g in groups):
            raise LoRAPairingError(
                f"None of the parameters passed to {type(self).__name__} belongs to a LoRA pair "
                f"of the model ({len(pair_list)} pairs found, e.g. {pair_list[0].name}); pass the "
                "LoRA factors or the whole model."
            )
        defaults = dict(lora_options, lora=False, betas=tuple(aux_betas), eps=aux_eps)
        self.on_nonfinite = on_nonfinite
        self.linalg_dtype = linalg_dtype
        super().__init__(groups, defaults)
        self._sources = sources

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """The template every pair-aware optimizer follows: read each LoRA group (views, gradients,
        state), measure for clipping across all of them, compute every update of a group before
        applying any (so updates that read both factors see the pre-step ones), then step the
        AdamW group of the other tensors."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not any(p.grad is not None for g in self.param_groups if g.get("lora") for p in g["params"]):
            warnings.warn(_NO_GRAD_MSG.format(what=type(self).__name__), stacklevel=2)
        reads = []
        for gi, group in enumerate(self.param_groups):
            if group.get("lora"):
                self._check_lora_group(group)
                self._refresh_scaling(gi, group)
                reads.append((group, self._read(group)))
        clip = self._clip(reads)
        for group, work in reads:
            updates = [self._compute(group, w, clip) for w in work]
            for w, u in zip(work, updates):
                self._apply(group, w, u)
            group["step"] += 1
        for group in self.param_groups:
            if not group.get("lora"):
                self._aux_step(group, clip.coef)
        return loss

    # The four stages each optimizer defines (``_clip`` only if it clips):
    def _read(self, group: dict) -> list[Any]:  # pragma: no cover - abstract
        """The work items of one LoRA group (e.g. one per bucket of equal-shape pairs and factor)."""
        raise NotImplementedError

    def _clip(self, reads: list[tuple[dict, list[Any]]]) -> Clip:
        return Clip()

    def _compute(self, group: dict, work: Any, clip: Clip) -> Any:  # pragma: no cover - abstract
        """The update of one work item (its functional kernel), nothing written yet."""
        raise NotImplementedError

    def _apply(self, group: dict, work: Any, update: Any) -> None:  # pragma: no cover - abstract
        """Write the new factors and state, count skipped pairs."""
        raise NotImplementedError

    def _clip_to(self, lora_norms_sq: list[torch.Tensor]) -> Clip:
        """Clipping at ``max_grad_norm`` with torch's ``clip_grad_norm_`` formula,
        ``coef = min(1, max_grad_norm / (N + 1e-6))``: N is the global norm of the LoRA groups'
        gradients in the optimizer's geometry (``lora_norms_sq``, one 0-d tensor per group) and
        of the aux tensors' raw gradients; non-finite contributions are left out (those pairs
        are skipped anyway)."""
        self.last_grad_norm = self.last_clip_coef = None
        if not self.max_grad_norm:
            return Clip()
        parts = list(lora_norms_sq)
        parts += [full(p.grad).double().square().sum() for g in self.param_groups if not g.get("lora")
                  for p in g["params"] if p.grad is not None]
        if not parts:
            return Clip()
        sq = torch.stack([x.to(device=parts[0].device, dtype=torch.float64) for x in parts])
        norm = torch.where(sq.isfinite(), sq, 0.0).sum().sqrt()
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        self.last_grad_norm, self.last_clip_coef = norm, coef
        return Clip(norm, coef)

    def _raise_if_nonfinite(self, group: dict, index: list[int], ok: torch.Tensor, what: str) -> None:
        """Under ``on_nonfinite="raise"``, stop before anything is written if a pair is not ``ok``."""
        if self.on_nonfinite == "raise" and not bool(ok.all()):
            bad = [group["pair_names"][index[i]] for i in (~ok).nonzero().flatten().tolist()]
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient or update for {what} of LoRA pair(s) "
                f"{bad} at step {group['step']}. Lower the learning rate or enable gradient clipping; "
                "on_nonfinite='skip' skips such pairs instead."
            )

    @staticmethod
    def _count_skips(states: list[dict], ok: torch.Tensor) -> None:
        """Add 1 to ``nonfinite_skips`` of every pair that is not ``ok`` (it was left unchanged)."""
        torch._foreach_add_([st["nonfinite_skips"] for st in states], list((~ok).to(torch.int64).unbind(0)))

    def _check_lora_group(self, group: dict) -> None:
        ps = group["params"]
        if len(ps) != 2 * len(group["pair_names"]) or (ps and ps[0].dim() < 2):
            raise LoRAPairingError(_DEEPSPEED_MSG.format(what=type(self).__name__))

    def _refresh_scaling(self, gi: int, group: dict) -> None:
        sources = self._sources[gi] if gi < len(self._sources) else None
        if sources is not None:
            group["scaling"] = [pr.current_scaling() for pr in sources]

    def pair_buckets(self, group: dict, needs_grad: str) -> list[PairBucket]:
        """Batch the pairs of ``group`` whose factor ``needs_grad`` ("A" or "B") has a gradient."""
        ps = group["params"]
        buckets: dict[tuple, PairBucket] = {}
        for i, s in enumerate(group["scaling"]):
            A, B = ps[2 * i], ps[2 * i + 1]
            if (A if needs_grad == "A" else B).grad is None:
                continue
            key = (A.shape, B.shape, A.dtype, B.dtype, A.device,
                   getattr(A, "placements", None), getattr(B, "placements", None))
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = PairBucket([], [], [], [])
            b.index.append(i)
            b.A.append(A)
            b.B.append(B)
            b.scaling.append(s)
        return list(buckets.values())

    def _aux_step(self, group: dict, coef: torch.Tensor | None = None) -> None:
        params, grads, m, v, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("sparse gradients are not supported; use a dense embedding")
            st = self.state[p]
            if "exp_avg" not in st:
                dt = state_dtype_for(p, None)
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if coef is not None and grads:  # scaled copies: the user's .grad stays as computed
            grads = torch._foreach_mul(grads, coef.to(grads[0].device, grads[0].dtype))
        beta1, beta2 = group["betas"]
        adamw_update(params, grads, m, v, steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                     eps=group["eps"], weight_decay=group["weight_decay"])

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        """Load state, keeping each saved tensor's dtype (torch would cast state to the param dtype,
        silently turning float32 moments of bf16 parameters into bf16). A state saved by another
        kind of optimizer, or for other LoRA pairs (method, rank or target modules), is refused."""
        self._check_same_pairs(state_dict)
        saved = {
            k: {kk: vv.dtype for kk, vv in v.items() if torch.is_tensor(vv)}
            for k, v in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, dtypes in saved.items():
            if not isinstance(idx, int) or idx >= len(params):
                continue
            st = self.state[params[idx]]
            for key, dt in dtypes.items():
                if st[key].dtype != dt:
                    st[key] = st[key].to(dt)

    def _check_same_pairs(self, state_dict: dict) -> None:
        name = type(self).__name__
        saved = state_dict.get("param_groups", [])
        if any("lora" not in g for g in saved):
            raise ValueError(f"{name}.load_state_dict: this state was not saved by a pair-aware altlora optimizer "
                             "(its param groups carry no LoRA pairing, e.g. torch.optim.AdamW's); load a state saved "
                             f"by {name} for this model, or start the optimizer fresh")
        mine = [(g.get("pair_names"), g.get("shapes")) for g in self.param_groups if g.get("lora")]
        theirs = [(g.get("pair_names"), g.get("shapes", mine[i][1] if i < len(mine) else None))
                  for i, g in enumerate(g for g in saved if g.get("lora"))]
        if mine != theirs:
            raise ValueError(f"{name}.load_state_dict: the saved state is for other LoRA pairs than this "
                             f"optimizer's (another method, rank or set of target modules?): saved {_describe(theirs)}, "
                             f"here {_describe(mine)}; load the state saved for this model and adapter")

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def stats(self) -> dict:
        """Opt-in diagnostics (not computed during ``step``): phase, skipped pairs, Gram conditions."""
        out: dict[str, Any] = {"groups": []}
        total_skipped = 0
        for group in self.param_groups:
            if not group.get("lora"):
                continue
            ps, ridge = group["params"], group.get("ridge", 0.0)
            pairs = []
            for i, name in enumerate(group["pair_names"]):
                A, B = as_matrix(full(ps[2 * i])).double(), as_matrix(full(ps[2 * i + 1])).double()
                skipped = sum(int(self.state[p].get("nonfinite_skips", 0)) for p in (ps[2 * i], ps[2 * i + 1]))
                total_skipped += skipped
                pairs.append({
                    "name": name,
                    "scaling": group["scaling"][i],
                    "cond_BtB": _cond(B.mT @ B, ridge),
                    "cond_AAt": _cond(A @ A.mT, ridge),
                    "skipped_steps": skipped,
                })
            out["groups"].append({"step": group["step"], "phase": self.phase(group), "pairs": pairs})
        out["skipped_steps"] = total_skipped
        out["phase"] = out["groups"][0]["phase"] if out["groups"] else None
        if getattr(self, "last_grad_norm", None) is not None:  # the last step's clipping
            out["grad_norm"], out["clip_coef"] = float(self.last_grad_norm), float(self.last_clip_coef)
        return out

    def phase(self, group: dict | None = None) -> str:
        """Name of the factor(s) the next ``step()`` updates."""
        return "AB"


def _describe(groups: list[tuple]) -> str:
    pairs = [(n, shapes[2 * i:2 * i + 2] if shapes else None) for names, shapes in groups for i, n in enumerate(names or [])]
    shown = ", ".join(f"{n} {s}" if s else n for n, s in pairs[:2])
    return f"{len(pairs)} pairs ({shown}{', ...' if len(pairs) > 2 else ''})"


def _cond(gram: torch.Tensor, ridge: float) -> float:
    ev = torch.linalg.eigvalsh(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype))
    lo = ev[0].item()
    return float("inf") if lo <= 0 else ev[-1].item() / lo
