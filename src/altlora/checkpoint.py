"""The run folder: never clobber a finished run, and atomic checkpoints that resume exactly.

A ``checkpoint-<step>/`` folder holds::

    trainable.pt    every trainable tensor (LoRA factors, heads; all weights for full fine-tuning)
    optimizer.pt    optimizer.state_dict()
    scheduler.pt    scheduler.state_dict()
    rng.pt          the RNG states of every process (dropout)
    state.json      the step and running totals, written last

It is written into a hidden temporary folder and renamed into place, so a run killed while
writing leaves the previous checkpoints intact and no half-written one: only folders named
``checkpoint-<step>`` that contain ``state.json`` count.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .config import Config

__all__ = ["RunError", "checkpoints", "prepare_output_dir", "atomic_write_json", "save_checkpoint",
           "load_checkpoint", "rng_state"]

#: Settings a resumed run may change without changing what it computes.
RESUME_MAY_CHANGE = {"resume", "overwrite", "output_dir", "nproc", "threads", "device", "tensorboard", "eval_batch_size",
                     "save_every", "save_total_limit", "log_every", "stop_after_nonfinite"}


class RunError(RuntimeError):
    """The output folder or a checkpoint is in a state that the run must not touch."""


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def prepare_output_dir(cfg: Config, log: Callable[[str], None], write: bool = True) -> Path | None:
    """Check (and, if ``write``, create or clear) ``output_dir``; returns the checkpoint to resume.

    A finished run (``results.json``) is only replaced with ``overwrite``; an unfinished one
    (checkpoints, no results) needs ``resume`` or ``overwrite``. Resuming with settings that
    change the computation (lr, data, LoRA, ...) is refused: the run would not continue exactly.
    """
    out = Path(cfg.output_dir)
    if cfg.overwrite and cfg.resume:
        raise RunError("--overwrite and --resume contradict each other; pick one")
    if cfg.resume:
        ckpt = _resume_target(cfg, out)
        _check_same_config(cfg, out / "config.yaml")
        return ckpt
    if cfg.overwrite:
        if write and out.exists() and any(out.iterdir()):
            log(f"--overwrite: removing the previous run in {out}")
            shutil.rmtree(out)
    elif (out / "results.json").exists():
        raise RunError(f"{out} already holds a finished run (results.json); use another --output_dir "
                       "or pass --overwrite to replace it")
    elif checkpoints(out):
        raise RunError(f"{out} holds checkpoints of an unfinished run; pass --resume to continue it "
                       "or --overwrite to start again")
    if write:
        out.mkdir(parents=True, exist_ok=True)
    return None


def _resume_target(cfg: Config, out: Path) -> Path:
    if cfg.resume != "latest":
        ckpt = Path(cfg.resume)
        if not (ckpt / "state.json").is_file():
            raise RunError(f"{ckpt} is not a checkpoint folder (no state.json)")
        return ckpt
    if (out / "results.json").exists():
        raise RunError(f"{out} holds a finished run; nothing to resume")
    found = checkpoints(out)
    if not found:
        raise RunError(f"--resume: no checkpoint in {out}; start without --resume")
    return found[-1]


def _check_same_config(cfg: Config, saved_path: Path) -> None:
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = cfg.fields()
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        raise RunError(f"--resume with settings that differ from {saved_path} would not continue the run "
                       f"exactly ({'; '.join(changed)}); use the run's settings (e.g. --config {saved_path})")


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's RNG states (torch, Python, CUDA)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, progress: dict,
                    rng_states: list[dict], keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (temporary folder + rename), then prune old ones."""
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=out))
    try:
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                   tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **progress}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; returns ``state.json``.

    A file that cannot be read (damaged after it was written) raises :class:`RunError` naming it
    and the way out; nothing in the run folder is changed."""
    weights = _load(ckpt, "trainable.pt")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise RunError(f"{ckpt} does not match this model/LoRA configuration "
                       f"({len(weights)} saved tensors vs {len(params)} trainable)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer_state = _load(ckpt, "optimizer.pt")
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise RunError(f"{ckpt / 'optimizer.pt'} is not a state of this optimizer ({type(optimizer).__name__}: "
                       f"{e}); resume with the run's own method and settings, or start over with --overwrite") from None
    scheduler.load_state_dict(_load(ckpt, "scheduler.pt"))
    states = _load(ckpt, "rng.pt")
    _set_rng_state(states[rank % len(states)])  # another process count: exact unless dropout is on
    return json.loads((ckpt / "state.json").read_text())


def _load(ckpt: Path, name: str) -> Any:
    try:
        return torch.load(ckpt / name, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
        older = [p.name for p in checkpoints(ckpt.parent) if p != ckpt]
        fix = (f"resume from an older one (--resume {ckpt.parent / older[-1]}) or delete {ckpt.name}" if older
               else "start over with --overwrite")
        raise RunError(f"{ckpt / name} cannot be read as a torch checkpoint ({type(e).__name__}); the checkpoint "
                       f"is damaged: {fix}") from None
