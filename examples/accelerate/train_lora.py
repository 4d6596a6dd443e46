"""Train LoRA with an altlora optimizer under ``accelerate launch`` (DDP or FSDP2).

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train_lora.py
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/train_lora.py \\
        --model HuggingFaceTB/SmolLM2-135M --optimizer altlora_plus --lr 2e-4

Without ``--model`` it trains a tiny randomly initialised Llama on random tokens: a smoke test
that runs anywhere. Without GPUs, run the DDP config as
``ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/ddp.yaml --mixed_precision no ...``
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import altlora


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face model name or path (default: a tiny random Llama)")
    p.add_argument("--optimizer", default="altlora_plus", choices=sorted(altlora.OPTIMIZERS))
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="sequences per process and step")
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(0)  # the same initial LoRA factors on every rank
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tiny = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        base = LlamaForCausalLM(tiny)
    vocab = base.config.vocab_size
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, lora)

    # Build the optimizer from the unwrapped PEFT model, before prepare(): under FSDP2 accelerate
    # swaps the sharded tensors into optimizer.param_groups, which is where it reads them.
    optimizer = altlora.create_optimizer(model, args.optimizer, lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    data = torch.Generator().manual_seed(1 + accelerator.process_index)  # each rank its own batches
    for step in range(args.steps):
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=data).to(accelerator.device)
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            accelerator.print(f"step {step}: loss {loss.item():.4f} (rank 0)")


if __name__ == "__main__":
    main()
