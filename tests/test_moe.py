"""Mixture-of-LoRA-experts adapters (altlora.moe, the paper's Table 10): PEFT integration, pairing
of every expert, Theorem 1 per expert, exact resume, the router loss, the CLI."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import altlora
from altlora import moe
from conftest import PAIRED, rows
from lowrank_problem import rel
from tiny_models import assert_resumes_exactly, single_thread, tiny_llama, token_batch  # noqa: F401

E = 3


def moe_llama(seed=0, dtype=torch.float32, experts=E, top_k=0, nonzero_b=True):
    config = moe.register(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), experts, top_k)
    model = get_peft_model(tiny_llama(seed, dtype), config)
    if nonzero_b:  # every expert's B away from 0, so its Gram and its gates matter
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_experts_B" in n or "lora_router" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def test_every_expert_is_a_pair_and_the_router_goes_to_adamw():
    model = moe_llama()
    opt = altlora.AltLoRA(model)
    (lora,), aux = [g for g in opt.param_groups if g["lora"]], [g for g in opt.param_groups if not g["lora"]]
    assert len(lora["pair_names"]) == 2 * 2 * E  # 2 layers x (q, v) x experts
    assert lora["pair_names"][:E] == [f"base_model.model.model.layers.0.self_attn.q_proj.expert{e}[default]"
                                      for e in range(E)]
    assert len(aux) == 1 and all("lora_router" in n for n in aux[0]["param_names"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora["scaling"][0] == layer.scaling["default"] == 2.0


def test_the_adapted_model_starts_as_the_pretrained_one():
    x = token_batch(0)
    with torch.no_grad():
        want = tiny_llama()(input_ids=x).logits
        got = moe_llama(nonzero_b=False)(input_ids=x).logits  # B = 0 (PEFT's init): no change
    assert torch.equal(got, want)


@pytest.mark.parametrize("expert", range(E))
def test_theorem1_holds_for_every_expert(expert):
    """An AltLoRA A-step of expert e is the least-squares solution of s B_e X = G_e, G_e the
    gradient of the loss w.r.t. that expert's term s W_e = s B_e A_e of the layer (float64)."""
    model = moe_llama(dtype=torch.float64)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    A, B = layer.lora_experts_A["default"][expert], layer.lora_experts_B["default"][expert]
    s, x = layer.scaling["default"], token_batch(3)

    product = nn.Linear(A.in_features, B.out_features, bias=False, dtype=torch.float64)  # W_e itself
    with torch.no_grad():
        product.weight.copy_(B.weight @ A.weight)
    layer.lora_experts_A["default"][expert], layer.lora_experts_B["default"][expert] = nn.Identity(), product
    model(input_ids=x, labels=x).loss.backward()
    G = product.weight.grad / s  # d loss / d(s W_e)
    layer.lora_experts_A["default"][expert], layer.lora_experts_B["default"][expert] = A, B
    model.zero_grad()

    opt = altlora.AltLoRA(model, lr=1.0, beta1=0.0, ridge=0.0, convention="paper")  # A first, no clipping
    A0 = A.weight.detach().clone()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    direction = A0 - A.weight.detach()
    expected = torch.linalg.lstsq(s * B.weight.detach(), G).solution
    assert rel(direction, expected) < 1e-10  # float64, B_e of full column rank (cond < 1e2)


def test_router_loss_is_zero_when_balanced_and_log_e_when_one_expert_takes_all():
    layer = moe_llama().base_model.model.model.layers[0].self_attn.q_proj
    h = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        layer.lora_router["default"].weight.zero_()
        layer(h)
        assert abs(layer.router_losses["default"].item()) < 1e-6  # uniform gates
        layer.lora_router["default"].weight.zero_()
        layer.lora_router["default"].weight[0].fill_(1e3)  # expert 0 wins every token of positive sum
        h = torch.ones(2, 5, layer.in_features)
        layer(h)
        assert layer.router_losses["default"].item() == pytest.approx(math.log(E), rel=1e-5)


def test_top_k_keeps_k_gates_per_token():
    layer = moe_llama(top_k=2).base_model.model.model.layers[0].self_attn.q_proj
    g = layer.gates("default", torch.randn(4, 7, layer.in_features))
    assert ((g > 0).sum(-1) == 2).all() and torch.allclose(g.sum(-1), torch.ones(4, 7))


@pytest.mark.parametrize("cls, options", rows({k: v for k, v in PAIRED.items() if k in ("altlora", "altlora_plus",
                                                                                           "lora_plus", "lora_rite")}))
def test_resume_is_bit_identical(cls, options):
    assert_resumes_exactly(moe_llama, lambda m: cls(m, **options), extra_loss=lambda m: 1e-2 * moe.router_loss(m))


def test_save_and_load_give_the_same_model_and_merging_is_refused(tmp_path):
    model = moe_llama(top_k=2)
    model.save_pretrained(tmp_path)
    moe.save_settings(tmp_path, E, 2)
    loaded = moe.load_adapter(tiny_llama(), tmp_path)
    x = token_batch(1)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        loaded.merge_and_unload()


def test_methods_that_cannot_train_experts_say_which_can():
    for name in ("pissa", "dora", "adalora", "full"):
        with pytest.raises(altlora.methods.MethodError, match=r"cannot train a mixture of LoRA experts.*can: .*altlora"):
            altlora.methods.get(name).adapt(tiny_llama(), None if name == "full" else {"target_modules": ["q_proj"]},
                                            total_steps=4, experts=4)


def test_cli_trains_evaluates_and_refuses_to_merge_experts(tmp_path, capsys):
    from tiny_assets import make_llama, write_sft

    from altlora import cli

    model, data = make_llama(tmp_path / "llama"), write_sft(tmp_path / "sft.jsonl", n=40)
    argv = ["train", "--model", str(model), "--task", str(data), "--no_progress", "--max_steps", "4",
            "--batch_size", "8", "--r", "4", "--lora_alpha", "8", "--eval_every", "4", "--save_every", "2",
            "--val_size", "4", "--test_size", "6", "--eval_before", "false", "--experts", "3",
            "--router_top_k", "2", "--router_aux_weight", "1e-3"]
    assert cli.main(argv + ["--output_dir", str(tmp_path / "run"), "--optimizer", "altlora"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / moe.MOE_FILE).is_file()
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(adapter)]) == 0  # rebuilds the routed layers
    assert cli.main(["merge", str(adapter), str(tmp_path / "merged")]) == 2
    assert "mixture of 3 LoRA experts" in capsys.readouterr().err
    assert cli.main(argv + ["--output_dir", str(tmp_path / "p"), "--optimizer", "pissa"]) == 2
    assert "cannot train a mixture of LoRA experts" in capsys.readouterr().err
    assert cli.main(argv + ["--output_dir", str(tmp_path / "k"), "--router_top_k", "5"]) == 2
    assert "router_top_k must be between 0 and experts (3)" in capsys.readouterr().err
