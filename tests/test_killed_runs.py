"""A run killed with SIGKILL at any point resumes with ``--resume`` and ends bit-identical to an
uninterrupted one (same thread count), with every step logged once (slow: several processes).

The kill is injected in a child process by wrapping one function of the package before the run
starts, so the package itself carries no test hook.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_assets import make_llama, write_sft

pytestmark = pytest.mark.slow

CHILD = r"""
import os, signal, sys, torch
import altlora.checkpoint as ck, altlora.train as tr
from altlora import cli
point, at = sys.argv[1], int(sys.argv[2])
if point == "mid-step":  # die inside optimizer.step() of step `at`: gradients computed, nothing applied
    real_one_step = tr.one_step
    def one_step(run, step):
        if step == at:
            run.optimizer.step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        return real_one_step(run, step)
    tr.one_step = one_step
elif point == "mid-checkpoint-write":  # die after trainable.pt of checkpoint `at` is written
    real_save = torch.save
    def save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        if os.path.basename(str(path)) == "trainable.pt" and f"checkpoint-{at}-" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    ck.torch.save = save
else:  # die right after checkpoint `at` is in place
    real = tr.save_checkpoint
    def save_checkpoint(out, step, *a, **k):
        path = real(out, step, *a, **k)
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    tr.save_checkpoint = save_checkpoint
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return make_llama(d / "llama"), write_sft(d / "sft.jsonl", n=40)


def argv(tiny, out, *extra):
    model, data = tiny
    return ["train", "--model", str(model), "--task", str(data), "--output_dir", str(out), "--no_progress",
            "--max_steps", "8", "--batch_size", "8", "--r", "4", "--lora_alpha", "8", "--eval_every", "4",
            "--save_every", "2", "--save_total_limit", "0", "--log_every", "1", "--val_size", "4", "--test_size", "6",
            "--eval_before", "false", "--threads", "1", "--lora_dropout", "0.1", *extra]


def run(args, kill=None):
    code = [sys.executable, "-c", CHILD, *kill, *args] if kill else [sys.executable, "-m", "altlora.cli", *args]
    return subprocess.run(code, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = run(argv(tiny, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("point, at", [("mid-step", 5), ("mid-checkpoint-write", 4), ("right-after-checkpoint", 6)])
def test_a_killed_run_resumes_bit_identically(tiny, uninterrupted, tmp_path, point, at):
    out = tmp_path / "run"
    proc = run(argv(tiny, out), kill=[point, str(at)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "results.json").exists()
    complete = sorted(p.name for p in out.glob("checkpoint-*"))
    assert all((out / c / "state.json").is_file() for c in complete)  # a half-written one is never listed
    proc = run(argv(tiny, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / complete[-1]}" in proc.stdout + proc.stderr
    a = (uninterrupted / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], "val_loss" in r) for r in rows]
    assert steps == [(r["step"], "val_loss" in r) for r in ref]  # no step missing or twice
    for r, q in zip(rows, ref):
        assert r.get("loss") == q.get("loss") and r.get("val_loss") == q.get("val_loss")
