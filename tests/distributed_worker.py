"""Worker for ``tests/test_distributed.py``: trains tiny PEFT Llamas under DDP or FSDP2 (gloo, CPU).

Run by ``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT``; both
engines share one launch (starting the workers costs more than all the training). Every rank writes
``OUT/rank<R>.pt``: ``{"ddp": ..., "fsdp2": ...}`` with, for each case, the whole (gathered)
trainable tensors after :data:`STEPS` steps, plus each engine's extra checks.
The single-process references are computed by the test itself with :func:`train` (``world=1``,
the whole global batch), so the two sides share only the model, data and schedule.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

import altlora
from altlora import methods
from altlora.optim.sharding import full
from conftest import CONTRACT
from tiny_models import tiny_llama, token_batch

STEPS = 10
GLOBAL_BATCH = 4  # split evenly across ranks
RESUME_AT = 4     # mid-phase for switch_every=3

# One adapted layer has rank 1, so under FSDP2 one rank holds an empty shard of its A.
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 1}, modules_to_save=["lm_head"])  # lm_head: aux AdamW group
ADALORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
MOE = dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])

# label -> (registered optimizer, lr, hyperparameters): the contract table of conftest.py
CASES = {label: (cls.name, kw["lr"], {k: v for k, v in kw.items() if k != "lr"})
         for label, (cls, kw) in CONTRACT.items()}
CASES["altlora_plus_moe"] = CASES["altlora_plus"]  # on mixture-of-LoRA-experts layers
# FSDP2: every case but AdaLoRA (PEFT's allocator cannot read DTensors; refused, tested below)
ENGINE_CASES = {"ddp": list(CASES), "fsdp2": [c for c in CASES if CASES[c][0] != "adalora"]}
RESUME_CASE = "altlora_plus_switch3"
SWAPPED_CASE = "altlora_b_first"
MUTANT_CASE = "altlora_plus"


def build_model(label: str, seed: int = 0) -> torch.nn.Module:
    base = tiny_llama(seed, torch.float64)
    if CASES[label][0] == "adalora":
        return methods.get("adalora").adapt(base, ADALORA, total_steps=STEPS)
    if label.endswith("_moe"):  # mixture of LoRA experts (altlora.moe): every expert a pair
        return methods.get("lora").adapt(base, MOE, experts=3, router_top_k=2)
    return methods.get("lora").adapt(base, LORA)


def build_optimizer(model: torch.nn.Module, label: str) -> torch.optim.Optimizer:
    name, lr, hp = CASES[label]
    return altlora.create_optimizer(model, name, lr=lr, **hp)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, *, start: int = 0,
          rank: int = 0, world: int = 1, mirror: bool = False, perturb: float = 0.0) -> None:
    """``steps`` steps, each on this rank's slice of the global batch (the mean loss over its
    equal-length rows); the engine averages the ranks' gradients.

    ``mirror=True`` (one process) computes what that average is, in the same arithmetic: the
    gradient of every slice's loss divided by ``world``, accumulated in rank order. For
    ``world == 2`` this is bitwise DDP's result: each rank's backward runs the same kernels on
    the same shapes, halving is exact in binary floating point, and a sum of two terms does
    not depend on the order the all-reduce adds them in.

    ``perturb`` multiplies every gradient entry by ``1 +- perturb`` (random signs, seeded) before
    each step: the test measures how much the trajectory amplifies round-off with it.
    """
    per_rank = GLOBAL_BATCH // world
    for t in range(start, start + steps):
        x = token_batch(t, n=GLOBAL_BATCH)
        for r in range(world) if mirror else [rank]:
            xr = x[r * per_rank:(r + 1) * per_rank]
            loss = model(input_ids=xr, labels=xr).loss
            (loss / world if mirror else loss).backward()
        if perturb:
            g = torch.Generator().manual_seed(t)
            for p in model.parameters():
                if p.grad is not None:
                    signs = torch.randint(0, 2, p.grad.shape, generator=g, dtype=p.grad.dtype) * 2 - 1
                    p.grad.mul_(1 + perturb * signs)
        opt.step()
        opt.zero_grad()


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole trainable tensors by name (gathered from FSDP2 shards)."""
    return {n: full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- DDP
def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)  # find_unused_parameters=False: every trainable needs a grad


def run_ddp(rank: int, world: int, out: str) -> dict:
    results = {}
    for label in ENGINE_CASES["ddp"]:
        model = build_model(label)
        opt = build_optimizer(model, label)
        train(_ddp(model), opt, STEPS, rank=rank, world=world)
        results[label] = trainable(model)

    # One checkpoint, written by rank 0 and read by every rank (DDP replicates the state).
    results["resumed"] = resumed_run(_ddp, rank, world, os.path.join(out, "checkpoint.pt"), rank == 0)
    return results


def resumed_run(prepare, rank: int, world: int, path: str, writes: bool) -> dict[str, torch.Tensor]:
    """RESUME_AT steps, a checkpoint on disk, then a model and optimizer built from another init,
    loaded from it and trained to STEPS. ``prepare(model)`` wraps or shards, returning what to call."""
    model = build_model(RESUME_CASE)
    net = prepare(model)
    opt = build_optimizer(model, RESUME_CASE)
    train(net, opt, RESUME_AT, rank=rank, world=world)
    if writes:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=True)
    resumed = build_model(RESUME_CASE, seed=123)  # everything must come from the checkpoint
    net = prepare(resumed)
    resumed.load_state_dict(ckpt["model"])
    opt = build_optimizer(resumed, RESUME_CASE)
    opt.load_state_dict(ckpt["optim"])
    train(net, opt, STEPS - RESUME_AT, start=RESUME_AT, rank=rank, world=world)
    return trainable(resumed)


# ---------------------------------------------------------------------------- FSDP2
def _shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run_fsdp2(rank: int, world: int, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for label in ENGINE_CASES["fsdp2"]:
        model = build_model(label)
        _shard(model, mesh)
        opt = build_optimizer(model, label)  # after fully_shard
        train(model, opt, STEPS, rank=rank, world=world)
        results[label] = trainable(model)

    # A planted bug the comparison must catch: AltLoRA+'s r x r Grams not summed over the shards.
    from altlora.optim import altlora as altlora_module

    model = build_model(MUTANT_CASE)
    _shard(model, mesh)
    opt = build_optimizer(model, MUTANT_CASE)
    real = altlora_module.all_reduce_sum
    altlora_module.all_reduce_sum = lambda x, layout: x
    try:
        train(model, opt, STEPS, rank=rank, world=world)
    finally:
        altlora_module.all_reduce_sum = real
    results["mutant"] = trainable(model)

    # Built before fully_shard, then given the sharded tensors the way accelerate's FSDP2
    # preparation does (param_groups[i]["params"] replaced, matched by parameter name).
    model = build_model(SWAPPED_CASE)
    opt = build_optimizer(model, SWAPPED_CASE)
    names = {id(p): n for n, p in model.named_parameters()}
    _shard(model, mesh)
    sharded = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    train(model, opt, STEPS, rank=rank, world=world)
    results["swapped"] = trainable(model)

    # Built before fully_shard and never told: its tensors get no gradients; step() must say so.
    model = build_model(SWAPPED_CASE)
    opt = build_optimizer(model, SWAPPED_CASE)
    _shard(model, mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 1, rank=rank, world=world)
    results["stale_warnings"] = [str(w.message) for w in caught]

    # One checkpoint per rank: the optimizer state of a sharded factor is this rank's part.
    results["resumed"] = resumed_run(lambda m: _shard(m, mesh), rank, world,
                                     os.path.join(out, f"fsdp2_checkpoint.rank{rank}.pt"), True)
    # torch.distributed.checkpoint, as the Trainer and accelerate save FSDP2 runs: every case
    results["dcp_resumed"] = {label: dcp_resumed_run(label, mesh, rank, world, os.path.join(out, f"dcp-{label}"))
                              for label in ENGINE_CASES["fsdp2"]}

    model = build_model("adalora")
    _shard(model, mesh)
    try:
        build_optimizer(model, "adalora")
    except NotImplementedError as e:
        results["adalora_refusal"] = str(e)
    return results


def dcp_resumed_run(label: str, mesh, rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    """RESUME_AT steps, ``get_state_dict`` + ``dcp.save`` (sharded state: each rank writes its
    part), then a model and optimizer built from another init, ``dcp.load`` + ``set_state_dict``,
    and the rest of the steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = build_model(label)
    _shard(model, mesh)
    opt = build_optimizer(model, label)
    train(model, opt, RESUME_AT, rank=rank, world=world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    resumed = build_model(label, seed=123)  # everything must come from the checkpoint
    _shard(resumed, mesh)
    opt = build_optimizer(resumed, label)
    model_sd, optim_sd = get_state_dict(resumed, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(resumed, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(resumed, opt, STEPS - RESUME_AT, start=RESUME_AT, rank=rank, world=world)
    return trainable(resumed)


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {"ddp": run_ddp(rank, world, out), "fsdp2": run_fsdp2(rank, world, out)}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
