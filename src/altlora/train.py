"""The training loop behind ``altlora train``: plain PyTorch, read top to bottom.

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
from pathlib import Path
from typing import Any, Callable

import torch

from . import launch, methods
from .checkpoint import atomic_write_json, load_checkpoint, prepare_output_dir, rng_state, save_checkpoint
from .config import Config, ConfigError, save_config
from .data import batch_indices, collate, features, load_task_for, loss_items
from .evaluate import eval_loss, evaluate_task
from .metrics import MetricsLog, optimizer_log_fields, peak_memory_mb, plot_loss
from .models import adapt, load_model, moves_base_weights, resolve_model, save_trained

__all__ = ["train"]


def _silent(message: str) -> None:
    pass


def train(cfg: Config, log: Callable[[str], None] = print, progress_bar: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.task`` with method ``cfg.optimizer``.

    Returns the content of ``results.json`` (an empty dict on processes other than rank 0).
    """
    d = launch.setup(cfg.device)
    try:
        return _train(cfg, d, log if d.is_main else _silent, progress_bar and d.is_main)
    finally:
        launch.teardown(d)


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


def _train(cfg: Config, d: launch.Dist, log: Callable[[str], None], progress_bar: bool) -> dict[str, Any]:
    from transformers import set_seed

    if cfg.batch_size < d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} cannot be split across {d.world} processes")
    method = methods.get(cfg.optimizer)
    with launch.main_process_first(d):  # rank 0 fetches assets and prepares the folder first
        task = load_task_for(cfg)
        model_path = resolve_model(cfg.model)
        resume_from = prepare_output_dir(cfg, log, write=d.is_main)
    out = Path(cfg.output_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = d.device
    bf16 = torch.cuda.is_bf16_supported() if cfg.bf16 == "auto" and device.type == "cuda" else cfg.bf16 == "true"

    # -------------------------------------------------------------- data, model, optimizer
    set_seed(cfg.seed)  # before the model: a new classification head is initialised on load
    model, tok = load_model(model_path, task.kind, task.labels)
    pad = tok.pad_token_id
    feats = features(task, tok, task.train, cfg.max_length)
    val_feats = features(task, tok, task.val, cfg.max_length)
    n, bs, accum = len(feats), cfg.batch_size, cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.epochs * n / (bs * accum))

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    model.to(device)
    set_seed(cfg.seed)  # again: LoRA init and data order must not depend on how much the load drew
    init_batches = None
    if "init_batches" in method.requires:  # LoRA-GA estimates gradients on the first batches
        init_batches = [to_device(collate([feats[i] for i in batch_indices(k, n, bs, cfg.seed)], pad))
                        for k in range(cfg.init_batches)]
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
    loop_clip = 0.0 if own_clip else cfg.max_grad_norm
    try:
        optimizer = method.create_optimizer(model, lr=cfg.lr, **hp)
    except (TypeError, ValueError) as e:  # a misspelt or out-of-range optim_args entry
        raise ConfigError(f"method {method.name!r} rejects lr={cfg.lr} with optim_args {hp}: {e}. Its "
                          f"hyperparameters: {', '.join(method.hyperparameters())}") from None
    scheduler = make_scheduler(cfg, optimizer, total)
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metric = "exact_match" if task.kind == "generation" else "accuracy"
    log(f"model {model_path} | task {task.name} ({task.kind}: {n} train / {len(task.val)} val / "
        f"{len(task.test)} test) | {method.name} lr {cfg.lr:g} | {trainable:,} trainable parameters | "
        f"{total} steps of {bs}x{accum} examples on {d.world} x {device}{' bf16' if bf16 else ''}")
    if cfg.max_grad_norm > 0:
        log(f"gradient clipping at {cfg.max_grad_norm:g}: " + (
            "by the optimizer, on the full-weight step of each LoRA pair's projected gradient" if own_clip
            else "raw gradients of every trainable tensor"))

    # -------------------------------------------------------------- fresh start or resume
    initial_adapter = out / "initial_adapter" if moves_base_weights(model) else None
    metrics = MetricsLog(out, enabled=d.is_main)
    progress: dict[str, Any] = {"elapsed_s": 0.0, "tokens": 0, "before": None}
    start = 0
    if resume_from is not None:
        progress = load_checkpoint(resume_from, model, optimizer, scheduler, d.rank)
        start = progress.pop("step")
        log(f"resumed from {resume_from} at step {start}")
    else:
        if d.is_main:
            save_config(cfg, out / "config.yaml")
            if initial_adapter is not None:
                model.save_pretrained(initial_adapter)
        if cfg.eval_before and d.is_main:  # rank 0 evaluates the unwrapped model; the others wait
            progress["before"] = evaluate_task(model, tok, task, task.test, cfg)
            log(f"before fine-tuning: test {metric} = {progress['before'][metric]:.4f}")
    metrics.start(start, cfg.tensorboard)

    # -------------------------------------------------------------- the loop
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    net.train()
    window = {"loss": 0.0, "tokens": 0.0, "time": 0.0, "steps": 0, "grad_norm": 0.0}
    for step in range(start, total):
        t0 = time.perf_counter()
        phase = optimizer_log_fields(optimizer, with_stats=False).get("phase", "")
        micro = [batch_indices(step * accum + m, n, bs, cfg.seed) for m in range(accum)]
        step_items = sum(loss_items(feats[i]) for idx in micro for i in idx)
        loss_share, tokens = 0.0, 0
        for m, idx in enumerate(micro):
            mine = [feats[i] for i in idx[d.rank::d.world]]  # this process's share of the micro-batch
            batch = to_device(collate(mine, pad))
            weight = sum(map(loss_items, mine)) / step_items  # its share of the step's mean loss
            sync = d.world == 1 or m == accum - 1  # all-reduce gradients once per optimizer step
            with nullcontext() if sync else net.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = net(**batch).loss * weight
                (loss * d.world).backward()  # DDP averages over processes; we want the sum
            loss_share += loss.item()
            tokens += int(batch["attention_mask"].sum())
        grad_norm = None
        if loop_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], loop_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if grad_norm is None:
            grad_norm = getattr(optimizer, "last_grad_norm", None)
        window["grad_norm"] = max(window["grad_norm"], float(grad_norm)) if grad_norm is not None else window["grad_norm"]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = d.sum([loss_share, tokens])
        dt = time.perf_counter() - t0
        done = step + 1
        progress["elapsed_s"] += dt
        progress["tokens"] += int(step_tokens)
        for k, v in (("loss", step_loss), ("tokens", step_tokens), ("time", dt), ("steps", 1)):
            window[k] += v
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:.0f}", phase=phase)
        if cfg.log_every and (done % cfg.log_every == 0 or done == total):
            metrics.record({"step": done, "epoch": round(done * accum * bs / n, 4),
                            "loss": window["loss"] / window["steps"], "lr": lr, "phase": phase,
                            "grad_norm_max": window["grad_norm"],
                            "tokens_per_s": window["tokens"] / window["time"],
                            "peak_memory_mb": round(peak_memory_mb(device), 1),
                            **{f"optim/{k}": v for k, v in optimizer_log_fields(optimizer).items() if k != "phase"}})
            window = dict.fromkeys(window, 0.0)
        if cfg.eval_every and val_feats and (done % cfg.eval_every == 0 or done == total) and d.is_main:
            row = {"step": done, "val_loss": eval_loss(model, val_feats, pad, cfg.eval_batch_size)}
            row.update({f"val_{k}": v for k, v in evaluate_task(model, tok, task, task.val, cfg).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"})
            metrics.record(row)
            message = f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
            if bar:
                bar.write(message)
            else:
                log(message)
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            states = d.gather(rng_state())
            if d.is_main:
                save_checkpoint(out, done, model, optimizer, scheduler, progress, states, cfg.save_total_limit)
            d.barrier()
    if bar:
        bar.close()
    metrics.close()

    # -------------------------------------------------------------- results
    if not d.is_main:
        d.barrier()
        return {}
    full = method.adapter == "full"
    saved = out / ("model" if full else "adapter")
    save_trained(model, tok, saved, {"model_path": str(Path(model_path).resolve()), "model": cfg.model,
                                     "kind": task.kind, "labels": task.labels, "task": task.name,
                                     "method": method.name, "full": full}, initial_adapter)
    after = evaluate_task(model, tok, task, task.test, cfg)
    png = plot_loss(metrics.rows(), out / "loss.png")
    if png is None:
        log("loss.png not written: matplotlib is missing (pip install 'altlora[train]')")
    results = {
        "task": task.name, "kind": task.kind, "model": cfg.model, "method": method.name, "lr": cfg.lr,
        "steps": total, "processes": d.world, "metric": metric, "before": progress["before"], "after": after,
        "train_time_s": round(progress["elapsed_s"], 2),
        "tokens_per_s": round(progress["tokens"] / max(progress["elapsed_s"], 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "trainable_parameters": trainable,
        "model_dir" if full else "adapter": str(saved), "metrics": str(metrics.path),
        "loss_curve": str(png) if png else None,
    }
    atomic_write_json(out / "results.json", results)
    d.barrier()
    before = f"before {progress['before'][metric]:.4f} -> " if progress["before"] else ""
    log(f"test {metric} ({after['n']} examples): {before}after {after[metric]:.4f}"
        f" | training {results['train_time_s']:.0f} s, {results['tokens_per_s']:.0f} tokens/s")
    log(f"results: {out / 'results.json'} | {'model' if full else 'adapter'}: {saved} | metrics: {metrics.path}"
        + (f" | loss curve: {png}" if png else ""))
    return results
