"""How a LoRA factor that may be an FSDP2 ``DTensor`` is seen by the rank-first math.

In rank-first form (``A`` as (r, d), ``B`` as ``B^T`` (r, k)) every update in this package is
*column-local*: column j of the new factor depends only on column j of the gradient and
moments plus r x r matrices (Grams, basis changes). So:

* a factor sharded along its columns (FSDP2's ``Shard(0)`` of ``B``: the k rows of B) is
  updated on its local shard; the r x r Grams and basis changes built from it are
  all-reduced (``B^T B = sum_ranks B_loc^T B_loc``), and so are the per-pair skip flags;
* a factor sharded along the rank dimension (``Shard(0)`` of ``A``) mixes rows in the solve,
  so it is gathered (r x d: small), updated identically on every rank, and its local rows
  are written back.

The result is exactly the single-process update; the only communication beyond FSDP's own is
the r x r all-reduces and the gather of ``A`` and its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..pairing import as_matrix

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - very old torch
    DTensor = None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


#: the other factor of a pair
OTHER = {"A": "B", "B": "A"}


def r_first(t: torch.Tensor, factor: str) -> torch.Tensor:
    """View a (local) factor with the rank dimension first: A -> (r, d), B -> B^T (r, k)."""
    m = as_matrix(t)
    return m if factor == "A" else m.mT


@dataclass(frozen=True)
class Layout:
    """``gathered``: the full tensor is used (its rank dim is sharded, or the caller needs whole
    factors, as the baselines in ``_batched`` do); ``group``: process group to all-reduce over
    because the local columns are a shard (None when columns are complete)."""

    gathered: bool = False
    group: object | None = None


_LOCAL = Layout()


def layout_of(t: torch.Tensor, factor: str) -> Layout:
    if not is_dtensor(t):
        return _LOCAL
    rank_dim = 0 if factor == "A" else 1
    sharded_cols = None
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise NotImplementedError(
                f"LoRA factor with placement {placement} is not supported; expected Shard or Replicate "
                "(FSDP2 fully_shard gives Shard(0))."
            )
        if placement.dim == rank_dim:
            return Layout(gathered=True)
        if sharded_cols is not None:
            raise NotImplementedError("a LoRA factor sharded over two mesh dimensions is not supported")
        sharded_cols = t.device_mesh.get_group(mesh_dim)
    return Layout(group=sharded_cols)


def local_r_first(t: torch.Tensor, factor: str, layout: Layout) -> torch.Tensor:
    """The part of ``t`` this rank computes with, rank-first."""
    if not is_dtensor(t):
        return r_first(t, factor)
    return r_first(t.full_tensor() if layout.gathered else t.to_local(), factor)


def write_r_first(t: torch.Tensor, factor: str, layout: Layout, values: list[torch.Tensor]) -> None:
    """Write rank-first ``values`` (one per tensor in ``t``) back into the factors."""
    if not t or not is_dtensor(t[0]):
        torch._foreach_copy_([r_first(p, factor) for p in t], values)
        return
    for p, v in zip(t, values):
        natural = (v if factor == "A" else v.mT).reshape(p.shape) if layout.gathered else None
        if natural is not None:  # keep only this rank's rows
            v_local = distribute_tensor(natural.contiguous(), p.device_mesh, p.placements,
                                        src_data_rank=None).to_local()
            p.to_local().copy_(v_local)
        else:
            r_first(p.to_local(), factor).copy_(v)


def as_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself unless it is a DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(local: torch.Tensor, p: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Optimizer state shaped like factor ``p``, given as this rank's rows: a DTensor with ``p``'s
    mesh and placements when ``p``'s columns (rank-first) are sharded, so that
    ``torch.distributed.checkpoint`` saves and loads every rank's part (as it does for torch's
    AdamW under FSDP2); ``local`` itself otherwise (a whole tensor, the same on every rank)."""
    if layout.group is None or not is_dtensor(p):
        return local
    # a fresh contiguous copy: ``local`` may be a view into a stacked batch, which a DTensor
    # must not wrap (torch.save of it fails)
    local = local.clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def all_reduce_sum(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=layout.group)
    return x


def all_reduce_and(flags: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.group is None:
        return flags
    as_int = flags.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=layout.group)
    return as_int.bool()


def all_finite(ts: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, is every entry finite (a bool each, stacked)? Exact, and one read of each
    tensor in the usual case: a finite max rules out NaN (max propagates it) and +inf, a finite
    sum rules out -inf. Only the tensors failing that test (a non-finite entry, or a sum of
    finite entries that overflowed) are checked entry by entry, which would otherwise write a
    full-size bool temporary per tensor (as long as AdamW's whole step, measured)."""
    flags = torch.ones(len(ts), dtype=torch.bool, device=ts[0].device if ts else None)
    idx = [i for i, t in enumerate(ts) if t.numel()]
    if idx:
        sub = [ts[i] for i in idx]
        quick = torch.stack(torch._foreach_max(sub)).isfinite() & torch.stack([t.sum() for t in sub]).isfinite()
        for j in (~quick).nonzero().flatten().tolist():
            flags[idx[j]] = torch.isfinite(sub[j]).all()
    return flags


def all_finite_everywhere(ts: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, is every entry finite, on every rank that holds a shard of it (a 0-d bool
    each, stacked)? A DTensor's flag is combined over its whole device mesh."""
    flags = all_finite([t.to_local() if is_dtensor(t) else t for t in ts])
    meshes = {id(t.device_mesh): t.device_mesh for t in ts if is_dtensor(t)}
    for mesh in meshes.values():
        for dim in range(mesh.ndim):
            flags = all_reduce_and(flags, Layout(group=mesh.get_group(dim)))
    return flags


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathers a DTensor); for diagnostics only."""
    return t.full_tensor() if is_dtensor(t) else t
