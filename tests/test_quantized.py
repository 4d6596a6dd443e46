"""QLoRA-style training on a quantized base (torchao weight-only int8 / int4, which run on CPU):
the LoRA pairs of the quantized layers are found, the factors stay float32, every paired
optimizer trains, resume is exact, and the CLI evaluates on the same quantized base and refuses
to merge. bitsandbytes is not used: its 4-bit CPU path fails in this environment (it fetches
kernels from the Hub); its 8-bit one runs."""

import io
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

pytest.importorskip("torchao")
from conftest import PAIRED, rows  # noqa: E402
from tiny_models import single_thread, tiny_llama, train_steps  # noqa: E402,F401  (autouse fixture)
from torchao.utils import TorchAOBaseTensor  # noqa: E402

from altlora.models import quantize_base  # noqa: E402


def quantized_peft(how, seed=0):
    base = quantize_base(tiny_llama(seed), how)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_the_base_is_quantized_and_the_factors_stay_float32(how):
    model = quantized_peft(how)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer().weight, TorchAOBaseTensor)
    assert not isinstance(model.base_model.model.lm_head.weight, TorchAOBaseTensor)  # tied to the embeddings
    assert layer.lora_A["default"].weight.dtype == torch.float32
    float_bytes = tiny_llama().model.layers[0].mlp.down_proj.weight.numel() * 4
    stored = model.base_model.model.model.layers[0].mlp.down_proj.weight.qdata
    assert stored.dtype == torch.int8 and stored.numel() * stored.element_size() == float_bytes // 4


@pytest.mark.parametrize("how", ["int8", "int4"])
@pytest.mark.parametrize("cls, options", rows({k: v for k, v in PAIRED.items() if k in ("altlora", "altlora_plus",
                                                                                           "lora_plus", "lora_pro")}))
def test_every_paired_optimizer_trains_on_a_quantized_base_and_resumes_exactly(how, cls, options):
    ref = quantized_peft(how)
    opt = cls(ref, **options)
    assert len(opt.param_groups[0]["pair_names"]) == 4
    train_steps(ref, opt, 6)

    model = quantized_peft(how)
    opt = cls(model, **options)
    train_steps(model, opt, 3)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buf = io.BytesIO()
    torch.save({"trainable": trainable, "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = quantized_peft(how)  # the quantized base is rebuilt; the checkpoint holds the trainables
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            if p.requires_grad:
                p.copy_(ckpt["trainable"][n])
    opt2 = cls(resumed, **options)
    opt2.load_state_dict(ckpt["optim"])
    train_steps(resumed, opt2, 3, start=3)
    a = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.isfinite(p).all() for p in a.values())


def test_cli_trains_on_a_quantized_base_evaluates_on_it_and_refuses_to_merge(tmp_path, capsys):
    from tiny_assets import make_llama, write_sft

    from altlora import cli

    model, data = make_llama(tmp_path / "llama"), write_sft(tmp_path / "sft.jsonl", n=40)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--task", str(data), "--output_dir", str(out), "--no_progress",
            "--max_steps", "3", "--batch_size", "8", "--r", "4", "--lora_alpha", "8", "--eval_every", "0",
            "--save_every", "0", "--val_size", "4", "--test_size", "6", "--eval_before", "false",
            "--optimizer", "altlora", "--quantize", "int8"]
    assert cli.main(argv) == 0
    after = json.loads((out / "results.json").read_text())["after"]["exact_match"]
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["exact_match"] == after
    assert cli.main(["merge", str(out / "adapter"), str(tmp_path / "merged")]) == 2
    assert "int8-quantized base" in capsys.readouterr().err
    assert cli.main(argv[:-1] + ["int3", "--output_dir", str(tmp_path / "x")]) == 2
    assert "quantize must be none, int8 or int4" in capsys.readouterr().err
