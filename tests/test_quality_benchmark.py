"""The quality benchmark's protocol logic: grids, lr selection, resuming and aggregation.

Training is replaced by finished run folders written here, so nothing is trained and no asset
is needed; the real runs are smoke-tested by ``benchmarks/quality.py --quick`` in CI.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
quality = sys.modules["quality_benchmark"] = importlib.util.module_from_spec(_spec)  # dataclasses need it
_spec.loader.exec_module(quality)


@pytest.fixture
def make_args(tmp_path, monkeypatch):
    def make(*argv):
        monkeypatch.setattr(sys, "argv", ["quality.py", "--run-root", str(tmp_path / "runs"),
                                          "--out-dir", str(tmp_path / "out"), *argv])
        return quality.parse_args()
    return make


def finish(args, variant, lr, seed, *, val, val_loss, test):
    """Write the folder a finished ``altlora train`` run leaves behind."""
    out = Path(quality.run_config(args, variant, lr, seed).output_dir)
    out.mkdir(parents=True)
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "val_loss": val_loss, "val_accuracy": val}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results.json").write_text(json.dumps({"metric": "accuracy", "after": {"accuracy": test},
                                                  "train_time_s": 3.0}))


def test_grids_are_central_and_altlora_is_in_weight_space_units():
    assert quality.grid("lora", 4) == [1e-4, 3e-4, 1e-3, 3e-3]
    assert quality.grid("lora", 2) == [3e-4, 1e-3]
    assert quality.grid("lora", 1) == [1e-3]                  # --quick: the central value
    assert quality.grid("lora", 2, shift=1) == [1e-3, 3e-3]
    assert quality.grid("lora", 2, shift=9) == [1e-3, 3e-3]   # clamped to the grid's end
    assert quality.grid("altlora", 9) == list(quality.GRIDS["altlora"])
    assert min(quality.grid("altlora", 4)) > max(quality.grid("lora", 4))
    assert quality.grid("altlora_rawclip", 4) == [0.01, 0.1, 1.0, 10.0]  # a main variant's own grid


def test_gap_closed_needs_full_to_beat_lora_by_more_than_the_noise():
    assert quality.gap(75.0, 70.0, 80.0) == pytest.approx(0.5)
    assert quality.gap(75.0, 70.0, 80.0, noise=10.0) is None
    assert quality.gap(75.0, 80.0, 70.0) is None
    assert quality.gap(None, 70.0, 80.0) is None


def test_plan_counts_grids_seeds_ablations_and_inits(make_args):
    args = make_args("--tasks", "polarity", "--methods", "lora,altlora", "--seeds", "3", "--lr-grid-size", "2")
    plan = quality.build_plan(args)
    names = [v.name for v in plan]
    assert names[:2] == ["lora", "altlora"]
    assert {"altlora/B-first", "altlora_plus/joint", "altlora/r=32", "lora/init=spectral/zero"} <= set(names)
    runner = quality.Runner(args, train=False, log=lambda m: None)
    by_name = {v.name: v for v in plan}
    assert runner.planned(by_name["lora"]) == 2 + 3 - 1        # grid, then seeds 1 and 2
    assert runner.planned(by_name["altlora"]) == 2 + 3 - 1
    assert runner.planned(by_name["altlora/B-first"]) == 3     # reuses altlora's lr
    assert by_name["altlora/B-first"].settings == {"optim_args": {"mode": "alternating", "first": "B"}}


def test_stack_suite_changes_each_method_away_from_its_own_default(make_args):
    """AltLoRA alternates and AltLoRA+ updates jointly by default: each gets the other order."""
    plan = quality.build_plan(make_args("--tasks", "polarity", "--suite", "stack"))
    names = {v.name for v in plan}
    assert {"altlora/joint updates", "altlora_plus/alternating updates", "altlora_plus/absolute ridge"} <= names
    assert not names & {"altlora/alternating updates", "altlora_plus/joint updates", "altlora_plus/first=A"}


def test_selection_resume_and_aggregate(make_args, monkeypatch):
    args = make_args("--tasks", "polarity", "--methods", "lora", "--suite", "main", "--seeds", "2",
                     "--lr-grid-size", "2")
    (v,) = quality.build_plan(args)
    # a tie on validation accuracy goes to the lower validation loss
    finish(args, v, 3e-4, 0, val=0.70, val_loss=0.50, test=0.71)
    finish(args, v, 1e-3, 0, val=0.70, val_loss=0.40, test=0.74)
    finish(args, v, 1e-3, 1, val=0.60, val_loss=0.45, test=0.70)

    import altlora.train
    monkeypatch.setattr(altlora.train, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    runner = quality.Runner(args, train=True, log=lambda m: None)
    assert runner.variant(v) == pytest.approx(1e-3)
    assert [r["status"] for r in runner.runs] == ["done"] * 3

    row = quality.aggregate(args, [v], runner)["polarity"]["lora"]
    assert row["test_by_seed"] == {0: pytest.approx(74.0), 1: pytest.approx(70.0)}
    assert row["mean"] == pytest.approx(72.0)
    assert row["std"] == pytest.approx(math.sqrt(8.0))
    assert row["pending_runs"] == 0 and row["paper"] == quality.PAPER["SST-2"]["lora"]


def test_missing_grid_run_leaves_the_variant_pending(make_args):
    args = make_args("--tasks", "polarity", "--methods", "lora", "--suite", "main", "--seeds", "2",
                     "--lr-grid-size", "2", "--report-only")
    (v,) = quality.build_plan(args)
    finish(args, v, 3e-4, 0, val=0.70, val_loss=0.50, test=0.71)
    runner = quality.Runner(args, train=False, log=lambda m: None)
    assert runner.variant(v) is None                            # no lr is chosen on half a grid
    assert [r["status"] for r in runner.runs] == ["done", "pending"]
    assert quality.aggregate(args, [v], runner)["polarity"]["lora"]["pending_runs"] == 2


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("polarity: {config: {max_steps: 5}\n", "not valid YAML"),
    ("- polarity\n", "expected a mapping of task names"),
    ("polarity: {paperr: SST-2}\n", "unknown key(s) ['paperr']; valid: base, paper"),
    ("big: {base: polarty}\n", "task 'big' extends unknown task 'polarty'"),
    ("polarity: {methods: [lora, altlora_pls]}\n", "unknown methods ['altlora_pls']"),
    ("polarity: {config: {max_stepz: 5}}\n", "unknown config key 'max_stepz'. Did you mean 'max_steps'"),
    ("polarity: {config: {max_steps: many}}\n", "max_steps must be"),
])
def test_bad_task_file_is_refused_with_file_and_fix(make_args, tmp_path, capsys, text, message):
    path = tmp_path / "tasks.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit):
        make_args("--task-file", str(path), "--tasks", "polarity")
    err = capsys.readouterr().err
    assert message in err and (text is None or "tasks.yaml" in err or "quality task 'polarity'" in err)


@pytest.mark.parametrize("flag, value, message", [
    ("--methods", "lora,altlora_pls", "--methods: unknown ['altlora_pls']; valid: pretrained, full"),
    ("--suite", "main,ablation", "--suite: unknown ['ablation']; valid: main, ablations, init"),
    ("--tasks", "sst2", "unknown task(s) ['sst2']; known: arithmetic, polarity"),
])
def test_bad_flags_list_the_valid_values(make_args, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        make_args(flag, value)
    assert message in capsys.readouterr().err


def test_a_task_file_task_can_extend_a_built_in_one(make_args, tmp_path):
    """Two budgets of one task: the second inherits the built-in spec and changes the steps."""
    path = tmp_path / "tasks.yaml"
    path.write_text("polarity_800: {base: polarity, suites: [main], config: {max_steps: 800, lr_scheduler: linear}}\n")
    args = make_args("--task-file", str(path), "--tasks", "polarity,polarity_800")
    big, small = args.task_specs["polarity_800"], args.task_specs["polarity"]
    assert big["config"] == {**small["config"], "max_steps": 800, "lr_scheduler": "linear"}
    assert big["paper"] == "SST-2" and big["suites"] == ["main"]


def test_runs_recorded_by_an_earlier_session_are_reused(make_args, tmp_path, monkeypatch):
    args = make_args("--tasks", "polarity", "--methods", "lora", "--suite", "main", "--seeds", "1",
                     "--lr-grid-size", "2", "--report-only")
    (v,) = quality.build_plan(args)
    finish(args, v, 3e-4, 0, val=0.70, val_loss=0.50, test=0.71)
    finish(args, v, 1e-3, 0, val=0.75, val_loss=0.40, test=0.74)
    runner = quality.Runner(args, train=False, log=lambda m: None)
    runner.variant(v)
    saved = tmp_path / "quality.json"
    saved.write_text(json.dumps({"runs": runner.runs}))
    monkeypatch.setattr(quality, "REUSED", {})
    args.run_root = tmp_path / "elsewhere"  # a new session: no run folders
    assert quality.reuse(str(saved)) == 2
    runner = quality.Runner(args, train=False, log=lambda m: None)
    assert runner.variant(v) == pytest.approx(1e-3)
    assert quality.aggregate(args, [v], runner)["polarity"]["lora"]["mean"] == pytest.approx(74.0)


def test_experts_suite_plans_table10_with_the_main_rows_lr(make_args):
    args = make_args("--tasks", "arithmetic", "--methods", "lora,altlora", "--suite", "main,experts")
    plan = {v.name: v for v in quality.build_plan(args)}
    for m in quality.EXPERT_METHODS:
        for e in quality.EXPERTS:
            v = plan[f"{m}/experts={e}"]
            assert v.settings == {"experts": e} and v.lr_from == m and v.suite == "experts"
    assert quality.run_config(args, plan["altlora/experts=8"], 0.3, 0).experts == 8


def test_the_pretrained_row_is_read_at_lr_zero(make_args):
    """Regression: lr 0 resolves to the method default in the config, and the row must still be
    found at the grid value 0 (it showed "not run" when the record carried the resolved lr)."""
    args = make_args("--tasks", "polarity", "--methods", "pretrained", "--suite", "main", "--seeds", "2",
                     "--report-only")
    (v,) = quality.build_plan(args)
    for seed, acc in ((0, 0.5), (1, 0.6)):
        out = Path(quality.run_config(args, v, 0.0, seed).output_dir)
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"metric": "accuracy", "val": {"accuracy": acc},
                                                      "after": {"accuracy": acc}}))
    runner = quality.Runner(args, train=False, log=lambda m: None)
    assert runner.variant(v) == 0.0
    row = quality.aggregate(args, [v], runner)["polarity"]["pretrained"]
    assert row["pending_runs"] == 0 and row["mean"] == pytest.approx(55.0)


def test_reuse_ignores_the_config_hash_of_the_run_folder():
    """Runs recorded before a new config field existed have another hash; they are the same run."""
    assert quality.run_key("/r/polarity/lora/lr0.001-s1-0123abcd") == "polarity/lora/lr0.001-s1"
    assert quality.run_key("/r/polarity/lora/lr0.001-s1-ffff0000") == quality.run_key("/x/polarity/lora/lr0.001-s1-0123abcd")
