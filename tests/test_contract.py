"""The contract every pair-aware optimizer keeps, written once and run on every row of the
table in ``conftest.py``: exact resume, the scheduler's lr, bf16 parameters, non-finite
gradients, bad arguments, the AdamW group for other tensors, and construction by name.
(DDP and FSDP2 run the same table in ``test_distributed.py``.)"""

import io

import pytest
import torch
from peft import LoraConfig, get_peft_model

import altlora
from altlora.optim import REGISTRY
from conftest import CONTRACT, PAIRED, rows
from lowrank_problem import Problem, rel
from tiny_models import assert_resumes_exactly, single_thread, tiny_llama, token_batch, train_steps  # noqa: F401


def tiny(seed=0, dtype=torch.float32):
    """A PEFT Llama with LoRA on q/v/down, non-zero B (every preconditioner is exercised) and the
    lm_head trained as an extra tensor."""
    model = get_peft_model(tiny_llama(seed, dtype), LoraConfig(r=4, lora_alpha=8, modules_to_save=["lm_head"],
                                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def trainables(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_resume_is_bit_identical(cls, options):
    assert_resumes_exactly(tiny, lambda m: cls(m, **options), n=5)  # odd: mid-phase for switch_every=3


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_lr_is_read_from_the_group_at_every_step(cls, options):
    """A scheduler halving the lr halves the first update (every update is linear in lr; LoRA-RITE's
    norm balancing is not, so it is off here)."""
    prob, s = Problem(), 2.0
    deltas = []
    for factor in (1.0, 0.5):
        A, B = prob.params(s)
        opt = cls(pairs=[(A, B, s)], **options, **({"balance_param": False} if cls.name == "lora_rite" else {}))
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor)
        a, b = A.detach().clone(), B.detach().clone()
        prob.backward(A, B, s)
        opt.step()
        deltas.append(torch.cat([(A.detach() - a).flatten(), (B.detach() - b).flatten()]))
    assert deltas[0].norm() > 0
    assert rel(deltas[1], 0.5 * deltas[0]) < 1e-8  # set by the subtraction X - X0 in float64


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_bf16_params_keep_float32_state_through_a_round_trip(cls, options):
    prob, s = Problem(), 2.0
    A = torch.nn.Parameter(prob.A0.to(torch.bfloat16))
    B = torch.nn.Parameter(prob.B0.to(torch.bfloat16))
    opt = cls(pairs=[(A, B, s)], **options)
    for _ in range(3):
        A.grad = B.grad = None
        W = prob.W0.float() + s * B.float() @ A.float()
        ((torch.tanh(prob.X.float() @ W.T) - prob.Y.float()) ** 2).mean().backward()
        opt.step()
    dtypes = {v.dtype for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
    assert dtypes <= {torch.float32, torch.int64}, dtypes
    assert torch.isfinite(A.float()).all() and torch.isfinite(B.float()).all()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = cls(pairs=[(A, B, s)], **options)
    fresh.load_state_dict(torch.load(buf, weights_only=True))  # torch alone would cast it to bf16
    assert {v.dtype for st in fresh.state.values() for v in st.values() if torch.is_tensor(v)} == dtypes


@pytest.mark.parametrize("cls, options", rows(PAIRED))
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_pair_is_skipped_and_counted_or_raises(cls, options, bad):
    prob, s = Problem(), 2.0
    A1, B1 = prob.params(s)
    A2, B2 = prob.params(s)
    opt = cls(pairs=[(A1, B1, s, "good"), (A2, B2, s, "bad")], **options)
    prob.backward(A1, B1, s)
    prob.backward(A2, B2, s)
    A2.grad[0, 0] = bad
    B2.grad[0, 0] = bad
    before = [t.detach().clone() for t in (A1, B1, A2, B2)]
    opt.step()
    assert not (torch.equal(A1.detach(), before[0]) and torch.equal(B1.detach(), before[1]))
    assert torch.equal(A2.detach(), before[2]) and torch.equal(B2.detach(), before[3])
    assert opt.stats()["skipped_steps"] >= 1
    strict = cls(pairs=[(A2, B2, s, "bad")], on_nonfinite="raise", **options)
    with pytest.raises(FloatingPointError, match="bad"):
        strict.step()
    assert torch.equal(A2.detach(), before[2]) and torch.equal(B2.detach(), before[3])  # nothing written


@pytest.mark.parametrize("cls, options", rows(PAIRED))
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr="1e-3"), "lr must be a number"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(aux_betas=(0.9, 1.5)), "aux_betas"),
    (dict(aux_lr=-1.0), "aux_lr"), (dict(on_nonfinite="ignore"), "on_nonfinite"),
])
def test_invalid_arguments_are_refused_by_name(cls, options, kwargs, match):
    A, B = Problem().params()
    with pytest.raises(ValueError, match=match):
        cls(pairs=[(A, B, 2.0)], **{**options, **kwargs})


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_other_trainable_tensors_are_updated_by_the_adamw_group(cls, options):
    model = tiny()
    opt = cls(model, **options)
    aux = [g for g in opt.param_groups if not g["lora"]]
    assert len(aux) == 1 and all("lm_head" in n for n in aux[0]["param_names"])
    head = aux[0]["params"][0]
    before = head.detach().clone()
    train_steps(model, opt, 1)
    assert not torch.equal(head.detach(), before)
    assert set(opt.state[head]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_create_optimizer_builds_every_registered_name(name):
    cls = REGISTRY[name]
    if getattr(cls, "adapter", "lora") == "adalora":
        model = altlora.methods.get(name).adapt(tiny_llama(), {"r": 4, "target_modules": ["q_proj"]}, total_steps=5)
    else:
        model = tiny()
    opt = altlora.create_optimizer(model, name, **CONTRACT.get(name, (cls, {}))[1])
    assert type(opt) is cls
    train_steps(model, opt, 1)


def test_create_optimizer_rejects_a_typo_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid names: .*altlora.*Did you mean 'altlora_plus'"):
        altlora.create_optimizer(tiny(), "altlora_pls")


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_grad_scaler_float16_steps_skip_overflow_once(cls, options):
    """PEFT's method-comparison loop: float16 autocast, ``scaler.step(optimizer)``. A step whose
    scaled gradients overflow is skipped by the scaler, so the optimizer neither moves nor counts
    a skip of its own; the next steps train."""
    model = tiny()
    opt = cls(model, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # overflows float16 at first, then backs off
    before = trainables(model)
    skipped_by_scaler, steps = 0, 16
    for t in range(steps):
        x = token_batch(t)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=x, labels=x).loss
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped_by_scaler += scaler.get_scale() < scale
        if t == 0:
            assert skipped_by_scaler == 1 and all(torch.equal(p, before[n]) for n, p in trainables(model).items())
        opt.zero_grad()
    assert 1 <= skipped_by_scaler < steps
    assert opt.stats()["skipped_steps"] == 0  # the scaler's skips are not the optimizer's
    after = trainables(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_a_compiled_model_trains_like_the_eager_one(cls, options):
    """``torch.compile(model)``: pairing sees through the wrapper (same pairs, same names, so
    checkpoints move between the two) and training equals the eager run. The aot_eager backend
    traces and partitions like inductor without generating C++ (seconds, not minutes)."""
    eager, compiled = tiny(), tiny()
    net = torch.compile(compiled, backend="aot_eager")
    opt_e, opt_c = cls(eager, **options), cls(net, **options)
    names = [g.get("pair_names") for g in opt_e.param_groups]
    assert names == [g.get("pair_names") for g in opt_c.param_groups] and "_orig_mod" not in str(names)
    train_steps(eager, opt_e, 3)
    train_steps(net, opt_c, 3)
    a, b = trainables(eager), trainables(compiled)
    # aot_eager runs the same aten kernels in the same order as eager mode: bitwise
    assert all(torch.equal(a[n], b[n]) for n in a)
    opt_e.load_state_dict(opt_c.state_dict())  # checkpoints move between the two
