"""Pairing by model structure on real (tiny, offline) PEFT models, and "nothing trainable is ignored".

Every model here is built from a tiny config, so nothing is downloaded. The checks compare the
optimizer's ``param_groups`` against an independent walk over PEFT's ``LoraLayer`` modules, by
tensor identity, and train a few steps with a real loss to see every trainable tensor move.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from altlora import (  # noqa: E402
    AltLoRA,
    AltLoRAPlus,
    LoRAPair,
    LoRAPairingError,
    create_optimizer,
    find_lora_pairs,
)
from altlora.optim import REGISTRY  # noqa: E402
from altlora.optim.altlora import AltLoRABase  # noqa: E402
from altlora.pairing import as_matrix  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_STEPS = 4  # >= 4 so that, alternating, each factor is updated at least twice

# (optimizer class, hyperparameters) for AltLoRA and AltLoRA+, wherever both are exercised. AltLoRA has no
# second-moment normalisation, so it needs a large lr for the tiny gradients of these tiny models
# to move every factor well above float32 rounding; the AdamW aux group gets a sane aux_lr.
OPTIMIZERS = [pytest.param(cls, dict(lr=1e-3) if cls.lr_is_adam_scale else dict(lr=1.0, aux_lr=1e-2), id=cls.__name__)
              for name, cls in REGISTRY.items() if name == cls.name and issubclass(cls, AltLoRABase)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add overhead (and spin badly on a busy host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- tiny models

def _ids(batch: int = 2, seq: int = 8, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _llama_base() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))


def _causal_lm_loss(model: nn.Module) -> torch.Tensor:
    ids = _ids()
    return model(input_ids=ids, labels=ids).loss


def build_llama(**lora_kw):
    kw = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    kw.update(lora_kw)
    return get_peft_model(_llama_base(), LoraConfig(**kw)), _causal_lm_loss


def build_gpt2():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return get_peft_model(base, cfg), _causal_lm_loss


def build_bert():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
        initializer_range=0.2,  # larger than the 0.02 default so attention (query) gradients are not ~0
    ))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, cfg)
    model.eval()  # deterministic (no dropout); gradients still flow
    labels = torch.tensor([0, 1])

    def loss(m):
        return m(input_ids=_ids(), labels=labels).loss

    return model, loss


class EmbNet(nn.Module):
    def __init__(self, num_embeddings: int = 20, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(num_embeddings, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.emb(x))


def build_embedding():
    torch.manual_seed(0)
    model = get_peft_model(EmbNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    x = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))
    target = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(2))
    return model, lambda m: (m(x) - target).square().mean()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


def build_conv():
    torch.manual_seed(0)
    model = get_peft_model(ConvNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    return model, lambda m: (m(x) - target).square().mean()


def build_two_adapters():
    model, loss = build_llama(target_modules=["q_proj", "v_proj"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("second")
    return model, loss


@dataclass
class Case:
    build: Callable
    n_pairs: int
    kinds: set = field(default_factory=lambda: {"linear"})
    adapter: str = "default"
    aux: tuple = ()  # name fragments of trainable tensors that must go to the AdamW aux group
    n_aux: int = 0


CASES = {
    "llama": Case(build_llama, n_pairs=2 * 7),
    "gpt2_conv1d": Case(build_gpt2, n_pairs=2 * 3),  # c_attn, attn.c_proj, mlp.c_proj
    "bert_cls_head": Case(build_bert, n_pairs=2 * 2, aux=("classifier.modules_to_save.default",), n_aux=2),
    "embedding": Case(build_embedding, n_pairs=1, kinds={"embedding"}),
    "conv2d": Case(build_conv, n_pairs=1, kinds={"conv"}),
    "two_adapters": Case(build_two_adapters, n_pairs=2 * 2, adapter="second"),
    "rank_alpha_pattern": Case(
        lambda: build_llama(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 32}), n_pairs=2 * 7),
    "rslora": Case(lambda: build_llama(use_rslora=True), n_pairs=2 * 7),
    "dora": Case(lambda: build_llama(target_modules=["q_proj", "v_proj"], use_dora=True),
                 n_pairs=2 * 2, aux=("lora_magnitude_vector.default",), n_aux=2 * 2),
    "lora_bias": Case(lambda: build_llama(target_modules=["q_proj", "v_proj"], lora_bias=True),
                      n_pairs=2 * 2, aux=("lora_B.default.bias",), n_aux=2 * 2),
}


# --------------------------------------------------------------------------- helpers

def structural_pairs(model: nn.Module) -> dict:
    """Independent oracle: {(module name, adapter): (A, B)} for every trainable PEFT factor pair."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        for ad in m.lora_A:
            a, b = m.lora_A[ad].weight, m.lora_B[ad].weight
            if a.requires_grad:
                assert b.requires_grad
                out[(name, ad)] = (a, b)
        for ad in m.lora_embedding_A:
            a, b = m.lora_embedding_A[ad], m.lora_embedding_B[ad]
            if a.requires_grad:
                assert b.requires_grad
                out[(name, ad)] = (a, b)
    return out


def optimizer_pairs(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor, torch.Tensor, str, str]]:
    """(pair name, A, B, A's param name, B's param name) for every pair in the LoRA groups."""
    out = []
    for g in opt.param_groups:
        if not g.get("lora"):
            continue
        ps, names = g["params"], g["param_names"]
        assert len(ps) == 2 * len(g["pair_names"]) == 2 * len(g["scaling"])
        assert len(set(g["pair_names"])) == len(g["pair_names"]), "pair names must be unique"
        for i, pname in enumerate(g["pair_names"]):
            module_name = pname.rsplit("[", 1)[0]  # labels are "<module>[<adapter>]"
            out.append((module_name, ps[2 * i], ps[2 * i + 1], names[2 * i], names[2 * i + 1]))
    return out


def pair_ids(opt) -> set[tuple[int, int]]:
    return {(id(a), id(b)) for _, a, b, _, _ in optimizer_pairs(opt)}


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_each_trainable_once(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a tensor appears in two param groups"
    train = trainable(model)
    missing = [n for n, p in train.items() if id(p) not in set(in_groups)]
    assert missing == [], f"trainable tensors not handed to the optimizer: {missing}"
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not frozen & set(in_groups), "frozen tensors were given to the optimizer"


def assert_pairs_match_structure(model, opt, case: Case) -> None:
    expected = structural_pairs(model)
    got = optimizer_pairs(opt)
    assert len(expected) == case.n_pairs
    assert len(got) == case.n_pairs
    by_module = {name: (a, b) for (name, ad), (a, b) in expected.items()}
    assert {ad for (_, ad) in expected} == {case.adapter}
    for pname, a, b, a_name, b_name in got:
        ea, eb = by_module[pname]
        assert a is ea and b is eb, f"{pname}: wrong factors paired"
        emb = "embedding_" if case.kinds == {"embedding"} else ""
        suffix = "" if emb else ".weight"
        assert a_name == f"{pname}.lora_{emb}A.{case.adapter}{suffix}"
        assert b_name == f"{pname}.lora_{emb}B.{case.adapter}{suffix}"
    assert {p.kind for p in find_lora_pairs(model)} == case.kinds


def train(model, loss_fn, opt, steps: int = N_STEPS) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- every model, both optimizers

@pytest.mark.parametrize("opt_cls, hp", OPTIMIZERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_pairs_by_structure_and_every_trainable_tensor_trains(case_name, opt_cls, hp):
    case = CASES[case_name]
    model, loss_fn = case.build()
    opt = opt_cls(model, first="B", **hp)

    assert_each_trainable_once(model, opt)
    assert_pairs_match_structure(model, opt, case)

    # Everything trainable that is not a factor is in an AdamW aux group, under its own name.
    factor_ids = {id(t) for _, a, b, _, _ in optimizer_pairs(opt) for t in (a, b)}
    aux = {n: p for g in opt.param_groups if not g.get("lora")
           for n, p in zip(g["param_names"], g["params"])}
    assert {id(p) for p in aux.values()} == {id(p) for p in trainable(model).values()} - factor_ids
    assert len(aux) == case.n_aux
    for frag in case.aux:
        assert any(frag in n for n in aux), f"no aux tensor named like {frag!r}: {list(aux)}"
    for _, _, _, a_name, b_name in optimizer_pairs(opt):
        assert not any(frag in a_name or frag in b_name for frag in case.aux)

    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, loss_fn, opt)

    assert all(math.isfinite(v) for v in losses)
    assert opt.stats()["skipped_steps"] == 0
    unchanged = [n for n, p in trainable(model).items() if torch.equal(p, params_before[n])]
    assert unchanged == [], f"trainable tensors that never moved: {unchanged}"
    moved_frozen = [n for n, p in model.named_parameters()
                    if not p.requires_grad and not torch.equal(p, params_before[n])]
    assert moved_frozen == [], f"frozen tensors changed: {moved_frozen}"
    assert all(g["step"] == N_STEPS for g in opt.param_groups if g.get("lora"))


# --------------------------------------------------------------------------- layer kinds

def test_embedding_factors_shapes_and_kind():
    model, _ = build_embedding()
    (pair,) = find_lora_pairs(model)
    emb = model.base_model.model.emb
    assert pair.kind == "embedding"
    assert pair.A is emb.lora_embedding_A["default"]
    assert pair.B is emb.lora_embedding_B["default"]
    assert tuple(pair.A.shape) == (4, 20)  # (r, num_embeddings)
    assert tuple(pair.B.shape) == (8, 4)  # (embedding_dim, r)
    assert pair.rank == 4
    assert pair.current_scaling() == 2.0


def test_conv2d_factor_flattened_to_matrix():
    model, loss_fn = build_conv()
    (pair,) = find_lora_pairs(model)
    conv = model.base_model.model.conv
    assert pair.kind == "conv"
    assert pair.A is conv.lora_A["default"].weight and pair.B is conv.lora_B["default"].weight
    assert tuple(pair.A.shape) == (2, 3, 3, 3) and tuple(pair.B.shape) == (8, 2, 1, 1)
    assert tuple(as_matrix(pair.A).shape) == (2, 3 * 3 * 3)
    assert tuple(as_matrix(pair.B).shape) == (8, 2)

    opt = AltLoRA(model, lr=1e-2, first="B")
    train(model, loss_fn, opt, steps=2)
    # Optimizer state lives in the factors' matrix form: A -> (r, in*kh*kw), B -> (out, r).
    assert tuple(opt.state[pair.A]["exp_avg"].shape) == (2, 27)
    assert tuple(opt.state[pair.B]["exp_avg"].shape) == (8, 2)
    assert tuple(pair.A.shape) == (2, 3, 3, 3), "the stored factor keeps its conv shape"


def test_gpt2_conv1d_fan_in_fan_out_factors():
    model, _ = build_gpt2()
    pairs = {p.name: p for p in find_lora_pairs(model)}
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    p = pairs["base_model.model.transformer.h.0.attn.c_attn"]
    # Conv1D stores its base weight as (in, out); the LoRA factors are still A (r, in), B (out, r).
    assert tuple(c_attn.base_layer.weight.shape) == (32, 96)
    assert p.A is c_attn.lora_A["default"].weight and p.B is c_attn.lora_B["default"].weight
    assert tuple(p.A.shape) == (4, 32) and tuple(p.B.shape) == (96, 4)
    assert tuple(pairs["base_model.model.transformer.h.0.mlp.c_proj"].A.shape) == (4, 128)


# --------------------------------------------------------------------------- several adapters

def test_only_active_trainable_adapter_is_paired():
    model, loss_fn = build_two_adapters()
    opt = AltLoRA(model, lr=1e-2, first="B")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4
    got = {name: (a, b) for name, a, b, _, _ in optimizer_pairs(opt)}
    assert set(got) == {n for n, _ in layers}
    all_in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, m in layers:
        a, b = got[name]
        assert a is m.lora_A["second"].weight and b is m.lora_B["second"].weight
        assert tuple(a.shape) == (2, 32)
        assert id(m.lora_A["default"].weight) not in all_in_groups
        assert id(m.lora_B["default"].weight) not in all_in_groups
    assert opt.param_groups[0]["scaling"] == [1.0] * 4  # second: alpha 2 / r 2

    default_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    train(model, loss_fn, opt)
    for n, p in model.named_parameters():
        if ".default." in n:
            assert torch.equal(p, default_before[n]), f"inactive adapter tensor {n} changed"


def test_two_active_adapters_on_one_module_pair_by_adapter_key():
    model, loss_fn = build_llama(target_modules=["q_proj"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    opt = AltLoRA(model, lr=1.0, aux_lr=1e-2, first="B")
    assert_each_trainable_once(model, opt)
    got = {(a_name, b_name): (a, b, s) for (_, a, b, a_name, b_name), s
           in zip(optimizer_pairs(opt), opt.param_groups[0]["scaling"])}
    assert len(got) == 4
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        for ad, scaling in (("default", 2.0), ("second", 1.0)):
            a, b, s = got[(f"{name}.lora_A.{ad}.weight", f"{name}.lora_B.{ad}.weight")]
            assert a is m.lora_A[ad].weight and b is m.lora_B[ad].weight
            assert s == scaling
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    train(model, loss_fn, opt)
    assert [n for n, p in trainable(model).items() if torch.equal(p, before[n])] == []


def test_added_but_inactive_adapter_is_not_paired():
    model, _ = build_llama(target_modules=["q_proj"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    pairs = find_lora_pairs(model)
    assert len(pairs) == 2
    assert {p.adapter for p in pairs} == {"default"}
    assert all(p.A.shape[0] == 4 for p in pairs)


# --------------------------------------------------------------------------- scaling

def _scaling_by_module(opt) -> dict[str, float]:
    out = {}
    for g in opt.param_groups:
        if g.get("lora"):
            out.update(zip((n.rsplit("[", 1)[0] for n in g["pair_names"]), g["scaling"]))
    return out


def _by_suffix(scalings: dict[str, float], suffix: str) -> set[float]:
    vals = {s for n, s in scalings.items() if n.endswith(suffix)}
    assert vals, suffix
    return vals


def test_rank_and_alpha_pattern_scaling():
    model, _ = CASES["rank_alpha_pattern"].build()
    opt = AltLoRA(model, lr=1e-2)
    s = _scaling_by_module(opt)
    assert _by_suffix(s, "q_proj") == {2.0}  # 8 / 4
    assert _by_suffix(s, "v_proj") == {4.0}  # rank_pattern: 8 / 2
    assert _by_suffix(s, "o_proj") == {8.0}  # alpha_pattern: 32 / 4
    for p in find_lora_pairs(model):
        assert p.rank == (2 if p.name.endswith("v_proj") else 4)
        assert p.current_scaling() == s[p.name]


def test_rslora_scaling():
    model, _ = build_llama(use_rslora=True, rank_pattern={"v_proj": 16})
    opt = AltLoRAPlus(model, lr=1e-3)
    s = _scaling_by_module(opt)
    assert _by_suffix(s, "q_proj") == {8 / math.sqrt(4)}  # 4.0, not alpha/r = 2.0
    assert _by_suffix(s, "v_proj") == {8 / math.sqrt(16)}  # 2.0, not alpha/r = 0.5


def _set_fixed_grads(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(trainable(model).items()):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("how", ["set_scale", "scaling_dict"])
def test_scaling_change_is_read_at_step_time(how):
    """Changing the scaling after construction changes group['scaling'] and the update as predicted.

    Paper convention, first step (zero momentum): update = lr (1-b1) (1/s^2) (Y Y^T + lam I)^-1 g,
    so doubling s with the same gradient quarters the update.
    """
    model1, _ = build_llama(target_modules=["q_proj", "v_proj"])
    model1.double()  # float64, so the predicted ratio is checked far above rounding noise
    gen = torch.Generator().manual_seed(5)
    for p in find_lora_pairs(model1):
        with torch.no_grad():
            p.B.copy_(torch.randn(p.B.shape, generator=gen, dtype=p.B.dtype))  # B != 0 so its Gram is well conditioned
    model2 = copy.deepcopy(model1)
    opt1 = AltLoRA(model1, lr=1e-2, convention="paper")
    opt2 = AltLoRA(model2, lr=1e-2, convention="paper")
    assert opt2.param_groups[0]["scaling"] == [2.0] * 4

    layers2 = [m for m in model2.modules() if isinstance(m, LoraLayer)]
    for m in layers2:
        if how == "set_scale":
            m.set_scale("default", 2.0)
        else:
            m.scaling["default"] = 4.0

    A1 = [p.A.detach().clone() for p in find_lora_pairs(model1)]
    A2 = [p.A.detach().clone() for p in find_lora_pairs(model2)]
    for m, opt in ((model1, opt1), (model2, opt2)):
        _set_fixed_grads(m)
        opt.step()
    assert opt1.param_groups[0]["scaling"] == [2.0] * 4
    assert opt2.param_groups[0]["scaling"] == [4.0] * 4
    for p1, p2, a1, a2 in zip(find_lora_pairs(model1), find_lora_pairs(model2), A1, A2):
        d1, d2 = p1.A.detach() - a1, p2.A.detach() - a2
        assert d1.abs().max() > 0
        torch.testing.assert_close(d2, d1 / 4, rtol=1e-7, atol=1e-12)

    # And again between two later steps: the next step sees the new value.
    for m in layers2:
        m.scaling["default"] = 0.5
    _set_fixed_grads(model2, seed=4)
    opt2.step()
    assert opt2.param_groups[0]["scaling"] == [0.5] * 4


# --------------------------------------------------------------------------- order independence

@pytest.mark.parametrize("opt_cls, hp", OPTIMIZERS)
def test_pairing_does_not_depend_on_parameter_order(opt_cls, hp):
    model, loss_fn = build_llama(target_modules=LLAMA_TARGETS + ["embed_tokens"])
    fwd = opt_cls(model, **hp)
    rev = opt_cls(list(model.parameters())[::-1], model=model, **hp)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(list(model.parameters())), generator=gen).tolist()
    params = list(model.parameters())
    shuffled = opt_cls([params[i] for i in perm], model=model, **hp)

    structure = {(id(a), id(b)) for a, b in structural_pairs(model).values()}
    assert len(structure) == 15
    assert pair_ids(fwd) == structure
    assert pair_ids(rev) == structure
    assert pair_ids(shuffled) == structure
    # Names travel with their tensors, whatever the order.
    for opt in (fwd, rev, shuffled):
        for pname, a, b, a_name, b_name in optimizer_pairs(opt):
            assert a_name.startswith(pname + ".lora_") and b_name.startswith(pname + ".lora_")
            assert ("lora_A." in a_name or "lora_embedding_A." in a_name)
            assert ("lora_B." in b_name or "lora_embedding_B." in b_name)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert {id(p) for p in trainable(model).values()} <= set(ids)
    # The reversed optimizer trains like the forward one on a copy of the model.
    train(model, loss_fn, rev)
    assert rev.stats()["skipped_steps"] == 0


# --------------------------------------------------------------------------- explicit pairs

class ManualLoRA(nn.Module):
    """A non-PEFT model: y = x (W0 + s B A)^T + bias, with its own A and B parameters."""

    def __init__(self, d: int = 8, k: int = 6, r: int = 3, s: float = 2.0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W0 = nn.Parameter(torch.randn(k, d, generator=gen), requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, d, generator=gen) / math.sqrt(d))
        self.B = nn.Parameter(torch.zeros(k, r))
        self.bias = nn.Parameter(torch.zeros(k))
        self.s = s

    def forward(self, x):
        return x @ (self.W0 + self.s * self.B @ self.A).T + self.bias


def _manual_loss():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 6, generator=gen)
    return lambda m: (m(x) - y).square().mean()


@pytest.mark.parametrize("opt_cls, hp", OPTIMIZERS)
@pytest.mark.parametrize("how", ["model", "params"])
def test_explicit_pairs_train_a_non_peft_model(opt_cls, hp, how):
    model = ManualLoRA()
    with pytest.raises(LoRAPairingError):
        opt_cls(model, **hp)  # no LoRA structure to find
    if how == "model":
        opt = opt_cls(model, first="B", pairs=[(model.A, model.B, lambda: model.s)], **hp)
    else:
        opt = opt_cls([model.A, model.B, model.bias], first="B",
                      pairs=[(model.A, model.B, lambda: model.s, "manual")], **hp)
    (pname, a, b, _, _), = optimizer_pairs(opt)
    assert a is model.A and b is model.B
    assert opt.param_groups[0]["scaling"] == [2.0]
    aux = [p for g in opt.param_groups if not g.get("lora") for p in g["params"]]
    assert len(aux) == 1 and aux[0] is model.bias

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = _manual_loss()
    losses = train(model, loss_fn, opt)
    assert losses[-1] < losses[0]
    for n in ("A", "B", "bias"):
        assert not torch.equal(getattr(model, n), before[n]), n
    assert torch.equal(model.W0, before["W0"])

    model.s = 3.0  # a callable scaling is re-read every step
    train(model, loss_fn, opt, steps=1)
    assert opt.param_groups[0]["scaling"] == [3.0]


@pytest.mark.parametrize("shapes", [((3, 8), (6, 2)), ((6, 3), (3, 8))], ids=["rank_mismatch", "swapped"])
def test_explicit_pairs_with_wrong_shapes_raise(shapes):
    (sa, sb) = shapes
    A, B = nn.Parameter(torch.randn(*sa)), nn.Parameter(torch.randn(*sb))
    with pytest.raises(LoRAPairingError) as exc:
        AltLoRA([A, B], pairs=[(A, B, 1.0)])
    msg = str(exc.value)
    assert str(tuple(sa)) in msg and str(tuple(sb)) in msg
    assert "(r, d)" in msg and "(k, r)" in msg
    with pytest.raises(LoRAPairingError):
        LoRAPair(A, B)


def test_explicit_pair_spec_of_wrong_form_raises():
    A, B = nn.Parameter(torch.randn(3, 8)), nn.Parameter(torch.randn(6, 3))
    with pytest.raises(LoRAPairingError, match=r"pairs\[0\].*\(A, B\[, scaling\[, name\]\]\)"):
        AltLoRA([A, B], pairs=[A])


# --------------------------------------------------------------------------- bad input

def test_model_without_lora_layers_explains_search_and_pairs_option():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(LoRAPairingError) as exc:
        AltLoRA(model, lr=1e-3)
    msg = str(exc.value)
    assert "No LoRA pairs found in Sequential" in msg
    assert "LoraLayer" in msg and "lora_A/lora_B" in msg and "lora_embedding_A" in msg
    assert "0.weight" in msg  # shows what trainable tensors it did see
    assert "get_peft_model" in msg and "pairs=[(A, B, scaling)" in msg


def test_params_without_model_or_pairs_raises():
    p = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(LoRAPairingError, match=r"pass the model.*pairs="):
        AltLoRAPlus([p], lr=1e-3)


@pytest.fixture
def small_llama():
    return build_llama(target_modules=["q_proj", "v_proj"])


def _assert_plain_value_error(exc_info, *fragments):
    assert exc_info.type is ValueError, exc_info.type  # not a pairing error
    msg = str(exc_info.value)
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("opt_cls", [AltLoRA, AltLoRAPlus])
def test_negative_lr_raises(small_llama, opt_cls):
    model, _ = small_llama
    with pytest.raises(ValueError) as exc:
        opt_cls(model, lr=-1e-3)
    _assert_plain_value_error(exc, "invalid lr", "-0.001", ">= 0")
    with pytest.raises(ValueError) as exc:
        create_optimizer(model, "altlora_plus" if opt_cls is AltLoRAPlus else "altlora", lr=-1.0)
    _assert_plain_value_error(exc, "invalid lr", "-1.0")


@pytest.mark.parametrize("opt_cls, kwargs, fragment", [
    (AltLoRAPlus, dict(betas=(0.9, 1.0)), "invalid betas[1]: 1.0"),
    (AltLoRAPlus, dict(betas=(-0.1, 0.999)), "invalid betas[0]: -0.1"),
    (AltLoRA, dict(beta1=1.0), "invalid beta1: 1.0"),
    (AltLoRA, dict(aux_betas=(0.9, 1.5)), "invalid aux_betas[1]: 1.5"),
])
def test_betas_outside_unit_interval_raise(small_llama, opt_cls, kwargs, fragment):
    model, _ = small_llama
    with pytest.raises(ValueError) as exc:
        opt_cls(model, lr=1e-3, **kwargs)
    _assert_plain_value_error(exc, fragment, "[0.0, 1.0)")


def _assert_deepspeed_message(exc_info):
    msg = str(exc_info.value)
    assert "DeepSpeed" in msg and "DDP" in msg and "FSDP2" in msg, msg


@pytest.mark.parametrize("layout", ["one_flat_tensor", "flat_per_param"])
def test_zero_flattened_lora_group_raises_at_step(small_llama, layout):
    """DeepSpeed ZeRO-1/2 replace the group's params with flat fp32 partitions."""
    model, loss_fn = small_llama
    opt = AltLoRA(model, lr=1e-2)
    group = next(g for g in opt.param_groups if g.get("lora"))
    if layout == "one_flat_tensor":
        flat = [nn.Parameter(torch.cat([p.detach().flatten() for p in group["params"]]))]
    else:
        flat = [nn.Parameter(p.detach().flatten()) for p in group["params"]]
    for f in flat:
        f.grad = torch.ones_like(f)
    group["params"] = flat
    loss_fn(model).backward()
    with pytest.raises(LoRAPairingError) as exc:
        opt.step()
    _assert_deepspeed_message(exc)


@pytest.mark.parametrize("attr", ["ds_id", "ds_tensor"])
@pytest.mark.parametrize("how", ["params", "model"])
def test_deepspeed_partitioned_parameter_raises(small_llama, attr, how):
    model, _ = small_llama
    pair = find_lora_pairs(model)[0]
    setattr(pair.A, attr, 0 if attr == "ds_id" else torch.empty(0))
    with pytest.raises(LoRAPairingError) as exc:
        if how == "params":
            AltLoRA([p for p in model.parameters() if p.requires_grad], model=model, lr=1e-3)
        else:
            AltLoRA(model, lr=1e-3)
    _assert_deepspeed_message(exc)


def test_zero3_empty_partition_raises(small_llama):
    """ZeRO-3 leaves 1-D placeholder tensors in the model: the pair is not a matrix pair."""
    model, _ = small_llama
    pair = find_lora_pairs(model)[0]
    pair.A.data = torch.empty(0)
    with pytest.raises(LoRAPairingError) as exc:
        AltLoRA(model, lr=1e-3)
    _assert_deepspeed_message(exc)


def test_unknown_optimizer_name_lists_valid_names_and_suggests(small_llama):
    model, _ = small_llama
    with pytest.raises(ValueError) as exc:
        create_optimizer(model, name="altlorra")
    msg = str(exc.value)
    assert "'altlorra'" in msg
    assert "altlora, altlora_plus, lora" in msg
    assert "Did you mean 'altlora'?" in msg
    assert isinstance(create_optimizer(model, name="altlora_plus", lr=1e-3), AltLoRAPlus)


# --------------------------------------------------------------------------- kohya-style networks

class KohyaLoRAModule(nn.Module):
    """The shape of kohya-ss/sd-scripts' LoRAModule: lora_down (A), lora_up (B, zero init), an
    alpha buffer, lora_dim and multiplier; output org(x) + lora_up(lora_down(x)) * multiplier * scale."""

    def __init__(self, org: nn.Module, dim: int = 4, alpha: float = 2.0, multiplier: float = 1.0):
        super().__init__()
        conv = isinstance(org, nn.Conv2d)
        self.lora_dim, self.multiplier, self.org = dim, multiplier, org
        self.register_buffer("alpha", torch.tensor(alpha))
        self.lora_down = (nn.Conv2d(org.in_channels, dim, org.kernel_size, org.stride, org.padding, bias=False) if conv
                          else nn.Linear(org.in_features, dim, bias=False))
        self.lora_up = nn.Conv2d(dim, org.out_channels, 1, bias=False) if conv else nn.Linear(dim, org.out_features,
                                                                                              bias=False)
        nn.init.zeros_(self.lora_up.weight)
        org.requires_grad_(False)

    def forward(self, x):
        return self.org(x) + self.lora_up(self.lora_down(x)) * self.multiplier * (self.alpha / self.lora_dim)


class TinyUNetish(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = KohyaLoRAModule(nn.Conv2d(3, 8, 3, padding=1), multiplier=0.5)
        self.proj = KohyaLoRAModule(nn.Linear(8, 6))

    def forward(self, x):
        return self.proj(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("opt_cls, hp", OPTIMIZERS)
def test_kohya_style_network_pairs_by_structure_and_params_alone_are_refused(opt_cls, hp):
    net = TinyUNetish()
    groups = [{"params": [net.conv.lora_down.weight, net.conv.lora_up.weight], "lr": hp["lr"]},
              {"params": [net.proj.lora_down.weight, net.proj.lora_up.weight], "lr": hp["lr"]}]
    with pytest.raises(LoRAPairingError, match=r"parameters alone do not say .*model=network.*kohya"):
        opt_cls(groups, **hp)  # what a trainer script's --optimizer_type module.Class does
    opt = opt_cls(groups, model=net, **hp)
    pairs = [(n, s) for g in opt.param_groups if g.get("lora") for n, s in zip(g["pair_names"], g["scaling"])]
    assert pairs == [("conv", 0.5 * 2.0 / 4), ("proj", 2.0 / 4)]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 6, generator=gen)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    losses = []
    for _ in range(N_STEPS):
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"conv.lora_down.weight", "conv.lora_up.weight", "proj.lora_down.weight", "proj.lora_up.weight"}
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("a_attr, b_attr, needs", [("lora_a", "lora_b", "alpha and rank"),
                                                   ("lora_down", "lora_up", "alpha and lora_dim")])
def test_child_factor_modules_without_scaling_attributes_are_refused(a_attr, b_attr, needs):
    """torchtune- and kohya-shaped modules whose scaling cannot be computed: named, with the way out."""
    layer = nn.Module()
    setattr(layer, a_attr, nn.Linear(8, 2, bias=False))
    setattr(layer, b_attr, nn.Linear(2, 8, bias=False))
    model = nn.Sequential(layer)
    with pytest.raises(LoRAPairingError, match=rf"0: has {a_attr}/{b_attr} but no {needs} .*pairs=\[\(A, B, scaling\)\]"):
        find_lora_pairs(model)
