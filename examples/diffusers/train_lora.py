"""LoRA fine-tuning of a diffusion UNet with AltLoRA+, in the shape of diffusers'
``examples/text_to_image/train_text_to_image_lora.py``: freeze the UNet, ``unet.add_adapter``
a PEFT LoRA config on the attention projections, predict the noise a DDPM scheduler added to the
latents, and save the LoRA weights. The only change for AltLoRA is the optimizer line: it gets
the UNet (``model=unet``) so it pairs the LoRA factors by structure.

Offline and CPU-sized: a tiny ``UNet2DConditionModel`` built from a config with random weights,
and random latents and text embeddings in place of a VAE, a text encoder and a dataset.

  python examples/diffusers/train_lora.py --steps 20 --optimizer altlora_plus --lr 1e-3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import altlora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' example's LoRA targets


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)


def add_lora(unet: UNet2DConditionModel, rank: int) -> UNet2DConditionModel:
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    return unet


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--optimizer", default="altlora_plus", help="any name of `altlora list methods`")
    p.add_argument("--lr", type=float, default=None, help="default: the method's")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--output_dir", type=Path, default=Path("runs/diffusers-lora"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    unet = add_lora(tiny_unet(args.seed), args.rank)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    method = altlora.methods.get(args.optimizer)
    # diffusers: optimizer_cls(lora_layers, lr=...). Here: the same, plus the UNet to pair by.
    if method.clips_in_own_geometry:  # AltLoRA clips its own step; do not clip raw gradients too
        optimizer = method.create_optimizer(unet, lr=args.lr, max_grad_norm=args.max_grad_norm)
    else:
        optimizer = method.create_optimizer(unet, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    # a fixed "dataset": latents and text embeddings the UNet learns to denoise
    data_latents = torch.randn(16, 4, 8, 8, generator=gen)
    data_text = torch.randn(16, 5, 12, generator=gen)
    losses = []
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(data_latents), (args.batch,), generator=gen)
        latents, encoder_hidden_states = data_latents[idx], data_text[idx]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        if not method.clips_in_own_geometry and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(lora_layers, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.4f}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    weights = args.output_dir / "pytorch_lora_weights.safetensors"
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, str(weights))
    print(f"saved {weights}")
    return {"losses": losses, "weights": weights, "unet": unet}


if __name__ == "__main__":
    main()
