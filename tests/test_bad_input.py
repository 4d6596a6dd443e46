"""docs/bad-input.md, case by case: each bad input gets one clear message naming the thing and the
fix, through the entry point a user takes, and nothing already written is changed."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_assets import make_bert, make_llama, write_cls, write_sft

import altlora
from altlora import LoRAPairingError, cli
from conftest import PAIRED, rows
from tiny_models import single_thread, tiny_llama, token_batch  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {"llama": make_llama(d / "llama"), "sft": write_sft(d / "sft.jsonl", n=40),
            "bert": make_bert(d / "bert"), "cls": write_cls(d / "cls.csv", n=40)}


def train_args(tiny, out, *extra, model="llama", data="sft"):
    return ["train", "--model", str(tiny[model]), "--task", str(tiny[data]), "--output_dir", str(out), "--no_progress",
            "--max_steps", "4", "--batch_size", "8", "--r", "4", "--lora_alpha", "8", "--eval_every", "0",
            "--save_every", "2", "--val_size", "4", "--test_size", "6", "--eval_before", "false", *extra]


@pytest.fixture(scope="module")
def unfinished(tiny, tmp_path_factory):
    """A run interrupted after its checkpoint at step 2 (its results.json removed)."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert cli.main(train_args(tiny, out)) == 0
    (out / "results.json").unlink()
    return out


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys, *patterns):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, err
    return err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_named_and_left_alone(tiny, unfinished, tmp_path, capsys, damage):
    run = tmp_path / "r"
    shutil.copytree(unfinished, run)
    f = run / "checkpoint-2" / ("optimizer.pt" if damage == "garbage" else "trainable.pt")
    f.write_bytes(b"not a checkpoint" if damage == "garbage" else f.read_bytes()[:100])
    before = snapshot(run)
    refused(train_args(tiny, run, "--resume"), capsys, str(f), "damaged", "--overwrite")
    assert snapshot(run) == before


@pytest.mark.parametrize("change", [("--optimizer", "lora_plus"), ("--r", "8"), ("--target_modules", "q_proj")])
def test_resuming_with_another_method_rank_or_targets_is_refused(tiny, unfinished, tmp_path, capsys, change):
    run = tmp_path / "r"
    shutil.copytree(unfinished, run)
    before = snapshot(run)
    refused(train_args(tiny, run, "--resume", *change), capsys, "would not continue the run exactly",
            change[0].lstrip("-").replace("optimizer", "optimizer"), "config.yaml")
    assert snapshot(run) == before


@pytest.mark.parametrize("cls, options", rows(PAIRED))
def test_optimizer_state_of_another_optimizer_or_adapter_is_refused(cls, options):
    def peft(r=4, targets=("q_proj", "v_proj")):
        model = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=8, target_modules=list(targets)))
        x = token_batch(0)
        model(input_ids=x, labels=x).loss.backward()
        return model

    model = peft()
    adamw = altlora.LoRAAdamW(model)
    adamw.step()
    with pytest.raises(ValueError, match="not saved by a pair-aware altlora optimizer"):
        cls(model, **options).load_state_dict(adamw.state_dict())
    ours = cls(model, **options)
    ours.step()
    with pytest.raises(ValueError, match="saved by a pair-aware altlora optimizer"):
        altlora.LoRAAdamW(model).load_state_dict(ours.state_dict())
    for other in (peft(r=8), peft(targets=("q_proj",))):
        with pytest.raises(ValueError, match="other LoRA pairs .*another method, rank or set of target modules"):
            cls(other, **options).load_state_dict(ours.state_dict())


def test_frozen_lora_factors_are_named():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.requires_grad_(False)
    with pytest.raises(LoRAPairingError, match="has LoRA factors, but none is trainable .*lora_A.*unfreeze"):
        altlora.AltLoRA(model)


def test_rank_zero_is_refused_before_anything_is_built(tiny, tmp_path, capsys):
    refused(train_args(tiny, tmp_path / "r", "--r", "0"), capsys, "r must be >= 1")
    assert not (tmp_path / "r").exists()


def test_a_diverged_run_stops_keeping_its_checkpoints(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    err = refused(train_args(tiny, out, "--optimizer", "lora", "--lr", "1e30", "--max_grad_norm", "0",
                             "--max_steps", "12", "--stop_after_nonfinite", "3"), capsys,
                  "non-finite for 3 steps in a row", "Lower --lr", "kept: checkpoint-")
    assert "no results.json" in err and not (out / "results.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*"))


@pytest.mark.parametrize("content, message", [
    ("", "no examples"),
    (json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n", "1 example(s) are too few"),
    (json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n" + json.dumps({"text": "fine", "label": "pos"}) + "\n",
     "line 2: missing field 'prompt' (found: text, label)"),
])
def test_unusable_data_files_name_the_file_and_the_problem(tiny, tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    refused(["train", "--model", str(tiny["llama"]), "--task", str(data), "--output_dir", str(tmp_path / "r"),
             "--no_progress"], capsys, str(data) if content.count("\n") != 1 else "", message)


def test_labels_unseen_in_training_are_named_at_evaluation(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(train_args(tiny, out, "--max_steps", "2", "--save_every", "0", model="bert", data="cls")) == 0
    rows_ = ["text,label"] + [f"great film {i},{'pos' if i % 3 else 'meh'}" for i in range(30)]
    data = tmp_path / "new.csv"
    data.write_text("\n".join(rows_) + "\n")
    capsys.readouterr()
    refused(["eval", "--adapter", str(out / "adapter"), "--task", str(data)], capsys,
            "label(s) ['meh'] were not seen in training", "knows ['neg', 'pos']")


def test_a_config_with_max_steps_and_epochs_is_refused(tiny, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 5\nepochs: 2\n")
    refused(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "r")], capsys,
            "set either max_steps or epochs, not both")
