"""DDP and FSDP2 give the single-process result on the same global batch (2 gloo ranks on CPU).

One ``torch.distributed.run`` launch of ``distributed_worker.py`` (10-20 s, mostly starting the
workers) runs every distributed case of both engines; the references are computed here in one
process (see the tolerances below).
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
from altlora.optim.altlora import AltLoRABase
from conftest import CONTRACT, PAIRED
from tiny_models import single_thread, tiny_llama  # noqa: F401  (autouse fixture)

WORLD = 2
TIMEOUT_S = 300
# Why the engines can differ from one process, and how much (float64 throughout):
# * DDP averages the ranks' gradients; the reference (``w.train(mirror=True)``) forms that
#   average in the same arithmetic, so every DDP run must equal it bitwise.
# * FSDP2 reduce-scatters the same average (exact likewise), and the baselines gather whole
#   factors, so they too must match bitwise. AltLoRA instead sums r x r Grams and basis
#   changes over the column shards (optim/sharding.py): another summation order than one
#   matmul, a relative difference of a few ulps per step, which the training trajectory then
#   amplifies. How much it amplifies is a property of the trajectory, not of the code: AltLoRA+
#   from B = 0 makes a sign-like first step, which leaves B's columns nearly parallel
#   (cond(B^T B) ~ 4e4 at the next A-step), and its unprojected second moment keeps that
#   step's round-off; from then on the tiny model roughly multiplies a perturbation by 30 per
#   step (measured: 1e-16 -> 3e-8 in 10 steps), while plain AltLoRA stays at 1e-16.
# So the FSDP2 tolerance of AltLoRA is measured, case by case, as the change of the reference
# when every gradient entry is perturbed by PERTURB per step (more than the few-ulp difference
# of two summation orders over <= 64 terms), times SAFETY for the random direction of
# round-off. A missing all-reduce moves the weights by 1e-2 or more (test below).
ULP = torch.finfo(torch.float64).eps
PERTURB = 64 * ULP
SAFETY = 10
# the baselines gather whole factors and torch's AdamW is elementwise: no partial sums
EXACT_UNDER_FSDP2 = {label for label, (cls, _) in CONTRACT.items() if not issubclass(cls, AltLoRABase)}


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


def reference_run(label: str, perturb: float = 0.0) -> dict[str, torch.Tensor]:
    model = w.build_model(label)
    w.train(model, w.build_optimizer(model, label), w.STEPS, world=WORLD, mirror=True, perturb=perturb)
    return w.trainable(model)


@functools.cache
def single_process(label: str) -> dict[str, torch.Tensor]:
    """The reference: one process computing the ranks' average gradient, no distributed wrapper."""
    ref = reference_run(label)
    init = w.trainable(w.build_model(label))
    assert all(not torch.equal(ref[n], init[n]) for n in ref), "the reference run did not train"
    return ref


def relative_errors(got: dict, ref: dict) -> dict[str, float]:
    assert got.keys() == ref.keys()
    return {n: ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-300)).item() for n in ref}


@functools.cache
def fsdp2_tolerance(label: str) -> float:
    """SAFETY x the reference's largest relative change under a PERTURB-sized perturbation."""
    return SAFETY * max(relative_errors(reference_run(label, PERTURB), single_process(label)).values())


def assert_matches(got: dict, label: str, engine: str, what: str) -> None:
    ref = single_process(label)
    if engine == "ddp" or label in EXACT_UNDER_FSDP2:
        different = [n for n in ref if not torch.equal(got[n], ref[n])]
        assert not different, f"{what}: not bitwise equal to the reference: {different}"
        return
    errs, tol = relative_errors(got, ref), fsdp2_tolerance(label)
    n = max(errs, key=errs.get)
    assert errs[n] <= tol, f"{what}: {n} differs by {errs[n]:.2e} (relative) > {tol:.2e}"


def test_reference_equals_one_process_on_the_whole_batch_after_one_step():
    """The mirrored average is the whole global batch's gradient: after one step both runs agree
    to round-off of the mean loss (two summation orders of 4 rows: a few ulps)."""
    for label in ("altlora", "lora"):
        whole, split = w.build_model(label), w.build_model(label)
        w.train(whole, w.build_optimizer(whole, label), 1)
        w.train(split, w.build_optimizer(split, label), 1, world=WORLD, mirror=True)
        errs = relative_errors(w.trainable(split), w.trainable(whole))
        assert max(errs.values()) < 64 * ULP, errs


@pytest.mark.parametrize("engine, label", [(e, x) for e, labels in w.ENGINE_CASES.items() for x in labels])
def test_matches_single_process(results, engine, label):
    """DDP: every optimizer of the registry; FSDP2: all but AdaLoRA (torch AdamW + PEFT allocator)."""
    for rank, res in enumerate(results):
        assert_matches(res[engine][label], label, engine, f"{engine} rank {rank}, {label}")


def test_fsdp2_comparison_catches_a_missing_gram_all_reduce(results):
    """The worker also trains AltLoRA+ with its r x r all-reduces replaced by no-ops: far outside
    the tolerance (so the tolerance is not hiding bugs of this kind)."""
    tol = fsdp2_tolerance(w.MUTANT_CASE)
    for res in results:
        worst = max(relative_errors(res["fsdp2"]["mutant"], single_process(w.MUTANT_CASE)).values())
        assert worst > 1e3 * tol, (worst, tol)


@pytest.mark.parametrize("engine", list(w.ENGINE_CASES))
def test_resume_from_checkpoint_equals_uninterrupted_run(results, engine):
    """DDP: one checkpoint from rank 0; FSDP2: one per rank (same number of ranks)."""
    for rank, res in enumerate(results):
        uninterrupted, resumed = res[engine][w.RESUME_CASE], res[engine]["resumed"]
        assert uninterrupted.keys() == resumed.keys()
        for n in uninterrupted:
            assert torch.equal(resumed[n], uninterrupted[n]), (engine, rank, n)


@pytest.mark.parametrize("label", w.ENGINE_CASES["fsdp2"])
def test_fsdp2_dcp_round_trip_equals_the_uninterrupted_run(results, label):
    """get_state_dict / dcp.save / dcp.load / set_state_dict mid-run (the path the Trainer and
    accelerate take for FSDP2 checkpoints): bit-identical to the run that never stopped."""
    for rank, res in enumerate(results):
        uninterrupted, resumed = res["fsdp2"][label], res["fsdp2"]["dcp_resumed"][label]
        different = [n for n in uninterrupted if not torch.equal(resumed[n], uninterrupted[n])]
        assert not different, (rank, different)


def test_fsdp2_optimizer_follows_tensors_swapped_into_param_groups(results):
    """accelerate builds the optimizer first and then swaps the sharded tensors into param_groups."""
    for rank, res in enumerate(results):
        assert_matches(res["fsdp2"]["swapped"], w.SWAPPED_CASE, "fsdp2", f"FSDP2 rank {rank}, swapped param_groups")


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


@pytest.mark.parametrize("name", sorted({cls.name for cls, _ in PAIRED.values()}))
def test_deepspeed_partitioned_factors_are_refused_by_every_paired_optimizer(name):
    """AltLoRA's refusal is tested in test_pairing.py; the baselines share it."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    next(p for n, p in model.named_parameters() if "lora_A" in n).ds_id = 0  # a ZeRO-3 parameter
    with pytest.raises(LoRAPairingError) as exc:
        altlora.create_optimizer(model, name, lr=1e-3)
    msg = str(exc.value)
    assert "DeepSpeed" in msg and "DDP" in msg and "FSDP2" in msg, msg
