"""DDP and FSDP2 give the single-process result on the same global batch (2 gloo ranks on CPU).

One ``torch.distributed.run`` launch of ``distributed_worker.py`` (10-20 s, mostly starting the
workers) runs every distributed case of both engines; the references are computed here in one
process with the whole global batch.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import altlora
import distributed_worker as w
from altlora import LoRAPairingError
from tiny_models import single_thread, tiny_llama  # noqa: F401  (autouse fixture)

WORLD = 2
TIMEOUT_S = 300
# float64 throughout. Observed: <= 8e-15 relative, except AltLoRA+ from B = 0 (7e-13: its first
# steps are sign-like, so gradient entries that cancel to ~eps carry their rounding into the
# update). A logic error (a missing all-reduce, a wrong shard) shows up at 1e-3 or more.
RTOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, **env: str) -> str:
    """``python -m <launcher> ...``: its output, or fail with it (killing every process on timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        log, _ = proc.communicate()
        pytest.fail(f"{args[0]} did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"{args[0]} failed:\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Per rank: ``{"ddp": {...}, "fsdp2": {...}}`` from the worker."""
    out = tmp_path_factory.mktemp("distributed")
    _run("torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", str(Path(__file__).with_name("distributed_worker.py")), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@functools.cache
def single_process(label: str) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch, no distributed wrapper."""
    model = w.build_model(label)
    opt = w.build_optimizer(model, label)
    w.train(model, opt, w.STEPS)
    ref = w.trainable(model)
    init = w.trainable(w.build_model(label))
    assert all(not torch.equal(ref[n], init[n]) for n in ref), "the reference run did not train"
    return ref


def assert_close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    errs = {n: ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-300)).item() for n in ref}
    n = max(errs, key=errs.get)
    assert errs[n] <= RTOL, f"{what}: {n} differs by {errs[n]:.2e} (relative)"


@pytest.mark.parametrize("engine, label", [(e, x) for e, labels in w.ENGINE_CASES.items() for x in labels])
def test_matches_single_process(results, engine, label):
    """DDP: every optimizer of the registry; FSDP2: all but AdaLoRA (torch AdamW + PEFT allocator)."""
    ref = single_process(label)
    for rank, res in enumerate(results):
        assert_close(res[engine][label], ref, f"{engine} rank {rank}, {label}")


@pytest.mark.parametrize("engine", list(w.ENGINE_CASES))
def test_resume_from_checkpoint_equals_uninterrupted_run(results, engine):
    """DDP: one checkpoint from rank 0; FSDP2: one per rank (same number of ranks)."""
    for rank, res in enumerate(results):
        uninterrupted, resumed = res[engine][w.RESUME_CASE], res[engine]["resumed"]
        assert uninterrupted.keys() == resumed.keys()
        for n in uninterrupted:
            assert torch.equal(resumed[n], uninterrupted[n]), (engine, rank, n)


def test_fsdp2_optimizer_follows_tensors_swapped_into_param_groups(results):
    """accelerate builds the optimizer first and then swaps the sharded tensors into param_groups."""
    ref = single_process(w.SWAPPED_CASE)
    for rank, res in enumerate(results):
        assert_close(res["fsdp2"]["swapped"], ref, f"FSDP2 rank {rank}, swapped param_groups")


def test_fsdp2_optimizer_built_before_fully_shard_warns(results):
    for res in results:
        caught = res["fsdp2"]["stale_warnings"]
        msgs = [m for m in caught if "fully_shard" in m]
        assert len(msgs) == 1 and "build it after fully_shard" in msgs[0], caught


def test_fsdp2_adalora_is_refused_naming_ddp(results):
    """PEFT's AdaLoRA rank allocator cannot read DTensors; the optimizer says so when built."""
    for res in results:
        msg = res["fsdp2"].get("adalora_refusal", "")
        assert "FSDP2" in msg and "DDP" in msg, msg


@pytest.mark.slow
def test_accelerate_ddp_example_runs_as_one_process_group():
    """examples/accelerate: the DDP config on CPU (MULTI_CPU, gloo). accelerator.print prints on
    the main process only, so one line per step means the two processes formed one group."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    log = _run("accelerate.commands.launch", "--config_file", str(examples / "ddp.yaml"),
               "--mixed_precision=no", f"--main_process_port={_free_port()}", str(examples / "train_lora.py"),
               "--steps", "2", ACCELERATE_USE_CPU="1")
    assert log.count("step 1: loss") == 1, log


PAIRED = [n for n in w.BASELINES if n != "lora"] + ["altlora_plus"]


@pytest.mark.parametrize("name", PAIRED)
def test_deepspeed_partitioned_factors_are_refused_by_every_paired_optimizer(name):
    """AltLoRA's refusal is tested in test_pairing.py; the baselines share it."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    next(p for n, p in model.named_parameters() if "lora_A" in n).ds_id = 0  # a ZeRO-3 parameter
    with pytest.raises(LoRAPairingError) as exc:
        altlora.create_optimizer(model, name, lr=1e-3)
    msg = str(exc.value)
    assert "DeepSpeed" in msg and "DDP" in msg and "FSDP2" in msg, msg
