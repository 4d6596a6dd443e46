"""Method registry: every name trains, inits keep the pretrained function, bad input is explained."""

import io

import pytest
import torch

import altlora
from altlora import methods
from altlora.methods import MethodError
from tiny_models import single_thread, tiny_llama, token_batch  # noqa: F401  (autouse fixture)

REQUIRED = ["full", "lora", "lora_plus", "scaled_gd", "scaled_adamw", "lora_rite", "lora_pro",
            "lora_pro_sgd", "pissa", "rslora", "dora", "adalora", "lora_ga", "altlora", "altlora_plus"]
RESEARCH_CODE = {"adamw": "full", "lora_rite": "lora_rite", "altlora": "altlora", "altlora_plus": "altlora_plus"}
TARGETS = {"target_modules": ["q_proj", "v_proj"]}
# learning rates at which 6 steps on one batch lower the loss for every method
LR = {"scaled_gd": 5e-2, "lora_pro_sgd": 0.5, "lora_pro": 1e-3, "full": 1e-3, "altlora": 5e-2,
      "altlora_b_first": 5e-2, "altlora_alternating": 5e-2}


def base_model(seed=0):
    return tiny_llama(seed)


def batch(seed=0):
    return token_batch(seed)


def requirements(m):
    x = batch(1)
    kw = {}
    if "total_steps" in m.requires:
        kw["total_steps"] = 20
    if "init_batches" in m.requires:
        kw["init_batches"] = [dict(input_ids=x, labels=x)]
    return kw


def adapted(name, seed=0, **kw):
    m = methods.get(name)
    return m, m.adapt(base_model(seed), None if m.adapter == "full" else TARGETS, **requirements(m), **kw)


def test_registry_has_every_paper_method_and_research_code_name():
    for name in REQUIRED:
        assert methods.get(name).name == name
    for alias, target in RESEARCH_CODE.items():
        assert methods.get(alias).name == target
    for name in ("altlora_b_first", "altlora_plus_joint", "altlora_alternating"):
        assert methods.get(name).name == name


def test_list_methods_is_structured_and_complete():
    listed = {d["name"]: d for d in methods.list_methods()}
    assert set(REQUIRED) <= set(listed)
    for d in listed.values():
        assert d["description"] and "\n" not in d["description"]
        assert "lr" in d["hyperparameters"] and d["optimizer"] in altlora.OPTIMIZERS
    assert listed["lora_plus"]["hyperparameters"]["ratio"] == 16.0
    assert listed["scaled_gd"]["hyperparameters"]["ridge"] == 1e-6
    assert listed["altlora_b_first"]["hyperparameters"]["first"] == "B"
    assert listed["altlora"]["hyperparameters"]["mode"] == "joint"  # the default since joint trained better
    assert listed["altlora_alternating"]["hyperparameters"]["mode"] == "alternating"
    assert listed["altlora_plus_alternating"]["hyperparameters"]["relative_ridge"] == 0.0
    assert "altlora_joint" in listed["altlora"]["aliases"]
    assert listed["rslora"]["adapter_options"]["use_rslora"] is True
    assert listed["adalora"]["requires"] == ["total_steps"]
    assert "adamw" in listed["full"]["aliases"]


@pytest.mark.parametrize("name", methods.names())
def test_every_method_trains_and_its_state_survives_weights_only_loading(name):
    m, model = adapted(name)
    opt = m.create_optimizer(model, lr=LR.get(name, 1e-2))
    x = batch()
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = m.create_optimizer(model, lr=LR.get(name, 1e-2))
    fresh.load_state_dict(sd)
    assert len(fresh.state) == len(opt.state)


def test_methods_adapt_as_documented():
    _, model = adapted("rslora")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 8**0.5)
    _, model = adapted("dora")
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    _, model = adapted("pissa")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # both factors from the SVD
    _, model = adapted("lora_ga")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.abs().sum() > 0 and layer.lora_B["default"].weight.abs().sum() > 0
    _, model = adapted("full")
    assert all(p.requires_grad for p in model.parameters())


def test_adalora_optimizer_calls_the_rank_allocator():
    m, model = adapted("adalora")
    opt = m.create_optimizer(model, lr=1e-2)
    x = batch()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.param_groups[0]["allocator_step"] == 3
    assert len(model.base_model.rankallocator.ipt) > 0  # importance scores were accumulated
    with pytest.raises(ValueError, match="not an AdaLoRA model"):
        altlora.create_optimizer(methods.get("lora").adapt(base_model(), TARGETS), "adalora", lr=1e-3)


def test_adalora_resume_is_exact_across_rank_allocation():
    """The allocator's importance EMAs and rank pattern live in the PEFT model; the optimizer's
    state_dict carries them, so a resumed run prunes the same ranks and ends bit-identical."""
    opts = dict(r=2, target_modules=["q_proj", "v_proj"], tinit=2, tfinal=2, deltaT=1)

    def build(seed=0):
        return methods.get("adalora").adapt(tiny_llama(seed), opts, total_steps=12)

    def train(model, opt, start, stop):
        for t in range(start, stop):
            x = batch(t)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

    ref = build()
    ref_opt = altlora.create_optimizer(ref, "adalora", lr=1e-2)
    train(ref, ref_opt, 0, 9)
    ref_scores = {n: t.clone() for n, t in ref.base_model.rankallocator.exp_avg_ipt.items()}
    train(ref, ref_opt, 9, 12)  # step 10 = total - tfinal fixes the budget and resets the scores
    model = build()
    opt = altlora.create_optimizer(model, "adalora", lr=1e-2)
    train(model, opt, 0, 6)  # mid-allocation: tinit 2 < 6 < total 12 - tfinal 2
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = build(seed=3)
    resumed.load_state_dict(ckpt["model"])
    opt2 = altlora.create_optimizer(resumed, "adalora", lr=1e-2)
    opt2.load_state_dict(ckpt["optim"])
    train(resumed, opt2, 6, 9)
    scores = resumed.base_model.rankallocator.exp_avg_ipt
    assert scores.keys() == ref_scores.keys() and all(torch.equal(scores[n], ref_scores[n]) for n in scores)
    train(resumed, opt2, 9, 12)
    a = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert ref.peft_config["default"].rank_pattern == resumed.peft_config["default"].rank_pattern


INIT_PAIRS = [(a, "zero") for a in ("gaussian", "kaiming", "spectral")] + \
             [("zero", b) for b in ("gaussian", "kaiming", "spectral")]


@pytest.mark.parametrize("a_init,b_init", INIT_PAIRS)
def test_init_ablation_starts_at_the_pretrained_model(a_init, b_init):
    x = batch()
    reference = base_model()
    with torch.no_grad():
        want = reference(input_ids=x).logits
    model = methods.get("altlora").adapt(base_model(), TARGETS, init=f"{a_init}/{b_init}")
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert torch.equal(got, want)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    zero, other = (A, B) if a_init == "zero" else (B, A)
    how = b_init if a_init == "zero" else a_init
    assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(other) == other.numel()
    if how == "spectral":
        U, _, Vh = torch.linalg.svd(layer.get_base_layer().weight.detach())
        ref = Vh[:8] if a_init == "spectral" else U[:, :8]
        assert torch.allclose(other.detach(), ref, atol=1e-5)
    elif how == "gaussian":
        assert abs(other.std().item() - 1 / 8) < 0.03
    else:  # kaiming-uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert other.abs().max() <= 1 / other.shape[1] ** 0.5
    # the model does train from there
    opt = methods.get("altlora_plus").create_optimizer(model, lr=1e-2, mode="joint")
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=x).logits, want)


# ----------------------------------------------------------------------------- bad input
def test_unknown_method_lists_names_and_suggests_the_closest():
    with pytest.raises(MethodError, match=r"valid names: .*lora_plus.*Did you mean 'lora_plus'\?"):
        methods.get("lora_pluss")
    with pytest.raises(MethodError, match="unknown method 'xyz'"):
        methods.get("xyz")


def test_adalora_without_total_steps_says_so():
    with pytest.raises(MethodError, match=r"total_steps=N"):
        methods.get("adalora").adapt(base_model(), TARGETS)


def test_lora_ga_without_gradient_batch_says_so():
    with pytest.raises(MethodError, match=r"gradient-estimation batch.*init_batches"):
        methods.get("lora_ga").adapt(base_model(), TARGETS)


@pytest.mark.parametrize("init,match", [
    ("zero/zero", "exactly one factor must be 'zero'"),
    ("gaussian/kaiming", "exactly one factor must be 'zero'"),
    ("orthogonal/zero", "init must be"),
    ("spectral", "init must be"),
])
def test_bad_init_is_rejected(init, match):
    with pytest.raises(MethodError, match=match):
        methods.get("lora").adapt(base_model(), TARGETS, init=init)


def test_init_is_refused_for_methods_with_their_own_init():
    with pytest.raises(MethodError, match="defines its own initialisation"):
        methods.get("pissa").adapt(base_model(), TARGETS, init="kaiming/zero")


def test_conflicting_lora_option_is_refused():
    with pytest.raises(MethodError, match="use_rslora=True"):
        methods.get("rslora").adapt(base_model(), {**TARGETS, "use_rslora": False})
    with pytest.raises(MethodError, match="lora_options do not apply"):
        methods.get("full").adapt(base_model(), TARGETS)


def test_unknown_optimizer_in_factory_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'lora_rite'"):
        altlora.create_optimizer(base_model(), "lora_rit")
