"""The training loop behind ``altlora train``: plain PyTorch, read top to bottom.

:func:`train` runs five stages: :func:`set_up` (data, model, optimizer, scheduler),
:func:`start_or_resume`, then :func:`one_step` and :func:`record` (log, evaluate, checkpoint)
for every step, and :func:`finish` (save, test, results.json).

The output folder::

    config.yaml          the resolved configuration
    metrics.jsonl        a row every ``log_every`` steps (loss, lr, phase, tokens/s, peak memory,
                         optimizer stats) and one per evaluation (validation loss and score)
    tensorboard/         the same scalars (``tensorboard: true``)
    checkpoint-N/        weights, optimizer, scheduler and RNG states (see :mod:`altlora.checkpoint`)
    initial_adapter/     PiSSA / OLoRA / LoRA-GA only: the step-0 adapter, to convert the result
    adapter/             the trained adapter (``save_pretrained``), tokenizer and altlora.json;
                         ``model/`` instead after full fine-tuning
    loss.png             the loss curve
    results.json         written last: its presence marks a finished run

The loss of an optimizer step is the mean over every predicted item (answer token, or
classified example) of its ``grad_accum`` micro-batches, so accumulation equals one large
batch. Under torchrun (``--nproc N``) every process runs this function: the model is wrapped
in DistributedDataParallel, each micro-batch is split across the processes (the global batch
is the one a single process would use), and only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import launch, methods
from .checkpoint import (RunError, atomic_write_json, checkpoints, load_checkpoint, prepare_output_dir, rng_state,
                         save_checkpoint)
from .config import Config, ConfigError, save_config
from .data import TaskData, batch_indices, collate, features, load_task_for, loss_items
from .evaluate import eval_loss, evaluate_task
from .metrics import MetricsLog, optimizer_log_fields, peak_memory_mb, plot_loss
from .moe import router_loss
from .models import adapt, load_model, moves_base_weights, quantize_base, resolve_model, save_trained

__all__ = ["train", "make_scheduler"]


def _silent(message: str) -> None:
    pass


def train(cfg: Config, log: Callable[[str], None] = print, progress_bar: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.task`` with method ``cfg.optimizer``.

    Returns the content of ``results.json`` (an empty dict on processes other than rank 0).
    """
    d = launch.setup(cfg.device)
    try:
        run = set_up(cfg, d, log if d.is_main else _silent)
        start = start_or_resume(run)
        bar = None
        if progress_bar and d.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=run.total, initial=start, desc="train", dynamic_ncols=True)
        run.net.train()
        for step in range(start, run.total):
            row = one_step(run, step)
            record(run, step + 1, row, bar)
        if bar:
            bar.close()
        return finish(run)
    finally:
        launch.teardown(d)


@dataclass
class Run:
    """What one training run holds, built by :func:`set_up` and read by the later stages."""

    cfg: Config
    d: launch.Dist
    log: Callable[[str], None]
    method: methods.Method
    task: TaskData
    model_path: Path
    out: Path
    resume_from: Path | None
    bf16: bool
    model: torch.nn.Module
    net: torch.nn.Module             # the model, wrapped in DDP when there are several processes
    tok: Any
    feats: list
    val_feats: list
    total: int                       # optimizer steps
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loop_clip: float                 # max_grad_norm the loop applies to raw gradients (0: none)
    trainable: int
    metric: str
    metrics: MetricsLog | None = None
    initial_adapter: Path | None = None
    progress: dict = field(default_factory=lambda: {"elapsed_s": 0.0, "tokens": 0, "before": None})
    nonfinite: int = 0               # consecutive steps with a non-finite loss
    window: dict = field(default_factory=lambda: dict.fromkeys(("loss", "tokens", "time", "steps", "grad_norm"), 0.0))

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.d.device) for k, v in batch.items()}


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The transformers schedule ``cfg.lr_scheduler`` with ``warmup_ratio`` of the steps warming up.

    Its warm-up starts at lr 0, so the first optimizer step moves nothing (for AltLoRA started
    on B = 0 that wastes two half-steps: B at lr 0, then A with B still 0). Unless
    ``warmup_starts_at_zero``, step t < W of a warm-up uses (t + 1) / (W + 1) of the peak
    (nanoGPT's formula); the rest of the schedule is unchanged.
    """
    from transformers import get_scheduler

    warm = math.ceil(cfg.warmup_ratio * total)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warm, num_training_steps=total)
    shapes = getattr(scheduler, "lr_lambdas", [])
    if cfg.warmup_starts_at_zero or not warm or not shapes or any(f(0) != 0 for f in shapes):
        return scheduler

    def from_first_step(f: Callable[[int], float]) -> Callable[[int], float]:
        return lambda t: (t + 1) / (warm + 1) if t < warm else f(t)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [from_first_step(f) for f in shapes])


def set_up(cfg: Config, d: launch.Dist, log: Callable[[str], None]) -> Run:
    """Data, model (adapted for the method), optimizer, scheduler and the DDP wrapper."""
    from transformers import set_seed

    if cfg.batch_size < d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} cannot be split across {d.world} processes")
    method = methods.get(cfg.optimizer)
    with launch.main_process_first(d):  # rank 0 fetches assets and prepares the folder first
        task = load_task_for(cfg)
        model_path = resolve_model(cfg.model)
        resume_from = prepare_output_dir(cfg, log, write=d.is_main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = d.device
    bf16 = torch.cuda.is_bf16_supported() if cfg.bf16 == "auto" and device.type == "cuda" else cfg.bf16 == "true"

    set_seed(cfg.seed)  # before the model: a new classification head is initialised on load
    model, tok = load_model(model_path, task.kind, task.labels)
    model = quantize_base(model, cfg.quantize)
    pad = tok.pad_token_id
    feats = features(task, tok, task.train, cfg.max_length)
    val_feats = features(task, tok, task.val, cfg.max_length)
    n, bs, accum = len(feats), cfg.batch_size, cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.epochs * n / (bs * accum))

    model.to(device)
    set_seed(cfg.seed)  # again: LoRA init and data order must not depend on how much the load drew
    init_batches = None
    if "init_batches" in method.requires:  # LoRA-GA estimates gradients on the first batches
        init_batches = [{k: v.to(device) for k, v in collate([feats[i] for i in batch_indices(k, n, bs, cfg.seed)],
                                                              pad).items()} for k in range(cfg.init_batches)]
    model = adapt(model, method, cfg, task.kind, total_steps=total, init_batches=init_batches).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hp = dict(cfg.optim_args)
    if cfg.weight_decay:
        hp.setdefault("weight_decay", cfg.weight_decay)
    # AltLoRA's step is a projected-gradient step in weight space: clipping its raw factor
    # gradients would scale the step by whichever factor's gradient is larger, so it clips the
    # full-weight step itself; every other method gets the usual clipping of raw gradients.
    own_clip = cfg.clip_in_optimizer and method.clips_in_own_geometry
    if method.clips_in_own_geometry:  # 0 turns the optimizer's own clipping off
        hp.setdefault("max_grad_norm", cfg.max_grad_norm if own_clip else 0.0)
    try:
        optimizer = method.create_optimizer(model, lr=cfg.lr, **hp)
    except (TypeError, ValueError) as e:  # a misspelt or out-of-range optim_args entry
        raise ConfigError(f"method {method.name!r} rejects lr={cfg.lr} with optim_args {hp}: {e}. Its "
                          f"hyperparameters: {', '.join(method.hyperparameters())}") from None
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    run = Run(cfg=cfg, d=d, log=log, method=method, task=task, model_path=model_path, out=Path(cfg.output_dir),
              resume_from=resume_from, bf16=bf16, model=model, net=net, tok=tok, feats=feats, val_feats=val_feats,
              total=total, optimizer=optimizer, scheduler=make_scheduler(cfg, optimizer, total),
              loop_clip=0.0 if own_clip else cfg.max_grad_norm,
              trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
              metric="exact_match" if task.kind == "generation" else "accuracy")
    log(f"model {model_path} | task {task.name} ({task.kind}: {n} train / {len(task.val)} val / "
        f"{len(task.test)} test) | {method.name} lr {cfg.lr:g} | {run.trainable:,} trainable parameters | "
        f"{total} steps of {bs}x{accum} examples on {d.world} x {device}{' bf16' if bf16 else ''}")
    if cfg.max_grad_norm > 0:
        log(f"gradient clipping at {cfg.max_grad_norm:g}: " + (
            "by the optimizer, on the full-weight step of each LoRA pair's projected gradient" if own_clip
            else "raw gradients of every trainable tensor"))
    return run


def start_or_resume(run: Run) -> int:
    """Restore the latest checkpoint, or save the config (and an initial adapter) and score the
    base model; returns the first step to run."""
    cfg, d = run.cfg, run.d
    run.initial_adapter = run.out / "initial_adapter" if moves_base_weights(run.model) else None
    run.metrics = MetricsLog(run.out, enabled=d.is_main)
    start = 0
    if run.resume_from is not None:
        run.progress = load_checkpoint(run.resume_from, run.model, run.optimizer, run.scheduler, d.rank)
        start = run.progress.pop("step")
        run.log(f"resumed from {run.resume_from} at step {start}")
    else:
        if d.is_main:
            save_config(cfg, run.out / "config.yaml")
            if run.initial_adapter is not None:
                run.model.save_pretrained(run.initial_adapter)
        if cfg.eval_before and d.is_main:  # rank 0 evaluates the unwrapped model; the others wait
            run.progress["before"] = evaluate_task(run.model, run.tok, run.task, run.task.test, cfg)
            run.log(f"before fine-tuning: test {run.metric} = {run.progress['before'][run.metric]:.4f}")
    run.metrics.start(start, cfg.tensorboard)
    return start


def one_step(run: Run, step: int) -> dict[str, Any]:
    """Forward and backward over the step's micro-batches (this process's share of each), clip,
    optimizer and scheduler step; returns the step's loss, tokens, time, lr, phase and norm."""
    cfg, d, optimizer = run.cfg, run.d, run.optimizer
    t0 = time.perf_counter()
    phase = optimizer_log_fields(optimizer, with_stats=False).get("phase", "")
    n, accum = len(run.feats), cfg.grad_accum
    micro = [batch_indices(step * accum + m, n, cfg.batch_size, cfg.seed) for m in range(accum)]
    step_items = sum(loss_items(run.feats[i]) for idx in micro for i in idx)
    loss_share, tokens = 0.0, 0
    for m, idx in enumerate(micro):
        mine = [run.feats[i] for i in idx[d.rank::d.world]]  # this process's share of the micro-batch
        batch = run.to_device(collate(mine, run.tok.pad_token_id))
        weight = sum(map(loss_items, mine)) / step_items  # its share of the step's mean loss
        sync = d.world == 1 or m == accum - 1  # all-reduce gradients once per optimizer step
        with nullcontext() if sync else run.net.no_sync():
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                loss = run.net(**batch).loss * weight
                objective = loss if cfg.experts <= 1 else loss + cfg.router_aux_weight * router_loss(run.model) * weight
            (objective * d.world).backward()  # DDP averages over processes; we want the sum
        loss_share += loss.item()
        tokens += int(batch["attention_mask"].sum())
    grad_norm = None
    if run.loop_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                                   run.loop_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if grad_norm is None:
        grad_norm = getattr(optimizer, "last_grad_norm", None)
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_loss, step_tokens = d.sum([loss_share, tokens])
    return {"loss": step_loss, "tokens": step_tokens, "time": time.perf_counter() - t0, "lr": lr, "phase": phase,
            "grad_norm": None if grad_norm is None else float(grad_norm)}


def record(run: Run, done: int, step: dict[str, Any], bar) -> None:
    """After step ``done``: progress, a metrics row every ``log_every`` steps, validation every
    ``eval_every``, a checkpoint every ``save_every``."""
    cfg, d, window = run.cfg, run.d, run.window
    run.nonfinite = 0 if math.isfinite(step["loss"]) else run.nonfinite + 1
    if cfg.stop_after_nonfinite and run.nonfinite >= cfg.stop_after_nonfinite:
        kept = [p.name for p in checkpoints(run.out)]
        raise RunError(f"the loss has been non-finite for {run.nonfinite} steps in a row (steps "
                       f"{done - run.nonfinite + 1}-{done}): the run diverged. Lower --lr, keep clipping on "
                       f"(--max_grad_norm), or look for bad examples; kept: {', '.join(kept) or 'no checkpoint'}, "
                       "no results.json (resume from a checkpoint with changed settings is refused: start a new run)")
    run.progress["elapsed_s"] += step["time"]
    run.progress["tokens"] += int(step["tokens"])
    for k in ("loss", "tokens", "time"):
        window[k] += step[k]
    window["steps"] += 1
    if step["grad_norm"] is not None:
        window["grad_norm"] = max(window["grad_norm"], step["grad_norm"])
    if bar:
        bar.update(1)
        bar.set_postfix(loss=f"{step['loss']:.4f}", lr=f"{step['lr']:.2e}",
                        tok_s=f"{step['tokens'] / step['time']:.0f}", phase=step["phase"])
    if cfg.log_every and (done % cfg.log_every == 0 or done == run.total):
        run.metrics.record({"step": done, "epoch": round(done * cfg.grad_accum * cfg.batch_size / len(run.feats), 4),
                            "loss": window["loss"] / window["steps"], "lr": step["lr"], "phase": step["phase"],
                            "grad_norm_max": window["grad_norm"], "tokens_per_s": window["tokens"] / window["time"],
                            "peak_memory_mb": round(peak_memory_mb(d.device), 1),
                            **{f"optim/{k}": v for k, v in optimizer_log_fields(run.optimizer).items() if k != "phase"}})
        run.window = dict.fromkeys(window, 0.0)
    if cfg.eval_every and run.val_feats and (done % cfg.eval_every == 0 or done == run.total) and d.is_main:
        row = {"step": done, "val_loss": eval_loss(run.model, run.val_feats, run.tok.pad_token_id, cfg.eval_batch_size)}
        row.update({f"val_{k}": v for k, v in evaluate_task(run.model, run.tok, run.task, run.task.val, cfg).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"})
        run.metrics.record(row)
        message = f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
        if bar:
            bar.write(message)
        else:
            run.log(message)
    if cfg.save_every and done % cfg.save_every == 0 and done < run.total:
        states = d.gather(rng_state())
        if d.is_main:
            save_checkpoint(run.out, done, run.model, run.optimizer, run.scheduler, run.progress, states,
                            cfg.save_total_limit)
        d.barrier()


def finish(run: Run) -> dict[str, Any]:
    """Save the adapter (or model), score it on the test split, write results.json and the plot."""
    cfg, d, out, metric, progress = run.cfg, run.d, run.out, run.metric, run.progress
    run.metrics.close()
    if not d.is_main:
        d.barrier()
        return {}
    full = run.method.adapter == "full"
    saved = out / ("model" if full else "adapter")
    save_trained(run.model, run.tok, saved, {"model_path": str(Path(run.model_path).resolve()), "model": cfg.model,
                                             "kind": run.task.kind, "labels": run.task.labels, "task": run.task.name,
                                             "method": run.method.name, "full": full, "experts": cfg.experts,
                                             "router_top_k": cfg.router_top_k, "quantize": cfg.quantize},
                 run.initial_adapter)
    after = evaluate_task(run.model, run.tok, run.task, run.task.test, cfg)
    png = plot_loss(run.metrics.rows(), out / "loss.png")
    if png is None:
        run.log("loss.png not written: matplotlib is missing (pip install 'altlora[train]')")
    results = {
        "task": run.task.name, "kind": run.task.kind, "model": cfg.model, "method": run.method.name, "lr": cfg.lr,
        "steps": run.total, "processes": d.world, "metric": metric, "before": progress["before"], "after": after,
        "train_time_s": round(progress["elapsed_s"], 2),
        "tokens_per_s": round(progress["tokens"] / max(progress["elapsed_s"], 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(d.device), 1), "trainable_parameters": run.trainable,
        "model_dir" if full else "adapter": str(saved), "metrics": str(run.metrics.path),
        "loss_curve": str(png) if png else None,
    }
    atomic_write_json(out / "results.json", results)
    d.barrier()
    before = f"before {progress['before'][metric]:.4f} -> " if progress["before"] else ""
    run.log(f"test {metric} ({after['n']} examples): {before}after {after[metric]:.4f}"
            f" | training {results['train_time_s']:.0f} s, {results['tokens_per_s']:.0f} tokens/s")
    run.log(f"results: {out / 'results.json'} | {'model' if full else 'adapter'}: {saved} | metrics: {run.metrics.path}"
            + (f" | loss curve: {png}" if png else ""))
    return results
