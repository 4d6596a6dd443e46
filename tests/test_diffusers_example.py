"""examples/diffusers/train_lora.py: a diffusers UNet with PEFT LoRA (``add_adapter``) trained by
AltLoRA/AltLoRA+ as diffusers' LoRA script trains it; the saved LoRA weights load back."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

pytest.importorskip("diffusers")
from tiny_models import single_thread  # noqa: E402,F401  (autouse fixture)

_path = Path(__file__).resolve().parents[1] / "examples" / "diffusers" / "train_lora.py"
_spec = importlib.util.spec_from_file_location("diffusers_train_lora", _path)
example = sys.modules["diffusers_train_lora"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.mark.parametrize("optimizer", ["altlora", "altlora_plus"])
def test_the_unet_lora_trains_and_its_saved_weights_load_back(tmp_path, optimizer):
    untrained = {n: p.detach().clone() for n, p in example.add_lora(example.tiny_unet(), 4).named_parameters()}
    out = example.main(["--steps", "30", "--optimizer", optimizer, "--output_dir", str(tmp_path)])
    losses, unet = out["losses"], out["unet"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])  # it learns to denoise its small dataset
    moved = [n for n, p in unet.named_parameters() if not torch.equal(p.detach(), untrained[n])]
    assert moved and all("lora_" in n for n in moved)  # only the LoRA factors train

    fresh = example.add_lora(example.tiny_unet(seed=1), 4)
    set_peft_model_state_dict(fresh, load_file(str(out["weights"])))
    gen = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 500]), torch.randn(2, 5, 12, generator=gen)
    fresh.load_state_dict({n: p for n, p in unet.state_dict().items() if "lora_" not in n}, strict=False)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, text).sample, unet(x, t, text).sample)
