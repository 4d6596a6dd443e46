"""Tiny models, tokenizer and data files built locally for the CLI/data tests (no downloads)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch

CHARS = string.ascii_letters + string.digits + " ?.,:+-=\n"


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", "[CLS]", "[SEP]", *CHARS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", cls_token="[CLS]", sep_token="[SEP]")


def make_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_sft(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?\nAnswer:", "completion": f" {a + b}"}) + "\n")
    return path


def write_cls(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    good, bad = ["great fun", "lovely", "a joy"], ["dull", "awful mess", "boring"]
    rows = ["text,label"]
    for i in range(n):
        pos = i % 2 == 0
        rows.append(f"{rng.choice(good if pos else bad)} film,{'pos' if pos else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path
