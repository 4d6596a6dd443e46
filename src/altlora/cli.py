"""The ``altlora`` command: train, eval, merge, list, assets.

    altlora train                                   # the default job (SmolLM2-135M, arithmetic, AltLoRA+)
    altlora train --config run.yaml --lr 5e-4       # YAML plus overrides
    altlora train --nproc 2                         # DistributedDataParallel over 2 processes
    altlora eval --adapter runs/default/adapter     # score a trained adapter on its task
    altlora eval --lm-eval TASK --adapter DIR       # an lm-evaluation-harness task
    altlora merge runs/default/adapter merged/      # write base + adapter as one model
    altlora list [methods|models|tasks]
    altlora assets fetch|verify|path [NAME ...]

Errors in the user's input (names, files, folders, settings) print one ``altlora: error:``
line and exit with status 2; ``ALTLORA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

#: ``altlora eval`` accepts these run settings (the data split and evaluation ones).
EVAL_FIELDS = {"model", "task", "subtasks", "val_size", "test_size", "data_seed", "max_eval_examples",
               "max_length", "max_new_tokens", "eval_batch_size", "prompt_field", "completion_field",
               "text_field", "label_field"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .assets import AssetError
    from .checkpoint import RunError
    from .config import ConfigError
    from .data import DataError
    from .evaluate import EvalError
    from .methods import MethodError
    from .models import ModelError
    from .pairing import LoRAPairingError

    return (AssetError, ConfigError, DataError, EvalError, MethodError, ModelError, LoRAPairingError, RunError)


def _config(args: argparse.Namespace, fields: set[str], base_yaml: str | None = None):
    from .config import resolve_config

    return resolve_config(args.config or base_yaml, {k: v for k, v in vars(args).items() if k in fields})


# ----------------------------------------------------------------------------- subcommands
def cmd_train(args: argparse.Namespace, fields: set[str], argv: list[str]) -> int:
    from . import launch

    cfg = _config(args, fields)
    if cfg.nproc > 1 and not launch.under_torchrun():
        # fail fast on bad input and fetch assets once, before starting the processes
        from .checkpoint import prepare_output_dir
        from .data import load_task_for
        from .models import resolve_model

        load_task_for(cfg)
        resolve_model(cfg.model)
        prepare_output_dir(cfg, print, write=False)
        print(f"altlora: starting {cfg.nproc} processes under torchrun", file=sys.stderr)
        return launch.relaunch(cfg.nproc, argv)
    from .train import train

    train(cfg, progress_bar=not args.no_progress)
    return 0


def cmd_eval(args: argparse.Namespace, fields: set[str]) -> int:
    from .data import load_task_for
    from .evaluate import evaluate_task, headline
    from .models import load_adapted, load_model, resolve_model

    if args.lm_eval:
        return _lm_eval(args, _config(args, fields))
    run_yaml = None
    if args.adapter and not args.config and (Path(args.adapter).parent / "config.yaml").is_file():
        run_yaml = str(Path(args.adapter).parent / "config.yaml")  # the run's own data settings
    cfg = _config(args, fields, run_yaml)
    task = load_task_for(cfg)
    if args.adapter:
        model, tok, meta = load_adapted(Path(args.adapter))
        if task.kind == "classification":
            task = task.relabelled(meta.get("labels") or [], f"the classifier in {args.adapter}")
    else:
        model, tok = load_model(resolve_model(cfg.model), task.kind, task.labels)
    examples = task.test if args.split == "test" else task.val
    res = evaluate_task(model, tok, task, examples, cfg)
    name, value = headline(res)
    f1 = f", f1_macro {res['f1_macro']:.4f}" if "f1_macro" in res else ""
    print(f"{task.name} {args.split} {name} = {value:.4f} ({res['n']} examples{f1})")
    for s in res.get("samples", [])[:3]:
        print(f"  target {s['target']!r}  prediction {s['prediction']!r}")
    _write(args.output, res)
    return 0


def _lm_eval(args: argparse.Namespace, cfg) -> int:
    from .evaluate import run_lm_eval
    from .models import META_FILE, ModelError, resolve_model

    model_path, adapter = args.model_path, None
    if args.adapter:
        meta_path = Path(args.adapter) / META_FILE
        if not meta_path.is_file():
            raise ModelError(f"{args.adapter} was not written by `altlora train` (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        model_path, adapter = (args.adapter, None) if meta.get("full") else (meta["model_path"], args.adapter)
    elif not model_path:
        model_path = resolve_model(cfg.model)
    res = run_lm_eval(str(model_path), args.lm_eval, adapter=adapter, include_path=args.lm_eval_include,
                      limit=args.limit, num_fewshot=args.num_fewshot, batch_size=cfg.eval_batch_size)
    print(json.dumps(res, indent=2, default=str))
    _write(args.output, res)
    return 0


def _write(path: str | None, obj: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=2, default=str))
        print(f"wrote {path}")


def cmd_merge(args: argparse.Namespace) -> int:
    from .checkpoint import RunError
    from .models import load_adapted

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RunError(f"{out} is not empty; pass --overwrite to replace its contents")
    model, tok, meta = load_adapted(Path(args.adapter))
    if meta.get("full"):
        raise RunError(f"{args.adapter} is a fully fine-tuned model, not an adapter: use it as it is")
    if meta.get("quantize", "none") != "none":
        raise RunError(f"{args.adapter} was trained on an {meta['quantize']}-quantized base: merging would fold it into "
                       "integer weights (lossy) or into float weights it was not trained with; use it as an adapter "
                       "on the quantized base (altlora eval --adapter)")
    if meta.get("experts", 1) > 1:
        raise RunError(f"{args.adapter} is a mixture of {meta['experts']} LoRA experts: its update depends on the "
                       "input through the router, so it has no merged weight; use it as an adapter "
                       "(altlora eval --adapter, or altlora.moe.load_adapter)")
    model.merge_and_unload().save_pretrained(out)
    tok.save_pretrained(out)
    print(f"merged {args.adapter} into {meta['model_path']} -> {out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import assets, methods
    from .data import BUILTIN_TASKS
    from .models import BUILTIN_MODELS

    def state(name: str) -> str:
        return "cached" if assets.is_ready(name) else "fetched on first use"

    if args.what in ("methods", "all"):
        print("methods (--optimizer NAME; also --method, --optim_notes):")
        for m in methods.list_methods():
            aliases = f" (alias: {', '.join(m['aliases'])})" if m["aliases"] else ""
            needs = f" [needs {', '.join(m['requires'])}]" if m["requires"] else ""
            print(f"  {m['name']:22s} {m['description']}{aliases}{needs}")
    if args.what in ("models", "all"):
        print("models (--model NAME, or a local Hugging Face model folder):")
        for name, desc in BUILTIN_MODELS.items():
            print(f"  {name:22s} {desc} [{state(name)}]")
    if args.what in ("tasks", "all"):
        print("tasks (--task NAME, or a .jsonl prompt/completion or .jsonl/.csv text/label file):")
        for name, desc in BUILTIN_TASKS.items():
            print(f"  {name:22s} {desc} [{state(name)}]")
        if assets.is_ready("arithmetic"):
            subs = sorted(p.parent.name for p in assets.asset_path("arithmetic").glob("*/task.json"))
            print("  arithmetic subtasks (--subtasks a,b): " + ", ".join(subs))
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    if args.action == "fetch":
        assets.fetch(args.names or None, log=print)
        return 0
    if args.action == "path":
        print(assets.cache_dir())
        return 0
    report = assets.verify(args.names or None)
    for name, status in report.items():
        print(f"{name:16s} {status}")
    return 0 if all(s == "ok" for s in report.values()) else 1


# ----------------------------------------------------------------------------- parser
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, set[str]]]:
    """The argument parser, and per subcommand the config keys it accepts as flags."""
    from .config import _FIELDS, add_config_flags

    p = argparse.ArgumentParser(prog="altlora", description="AltLoRA / AltLoRA+ LoRA fine-tuning, offline.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model with LoRA (or any registry method)", allow_abbrev=False,
                       description="Fine-tune. Defaults: SmolLM2-135M on arithmetic with AltLoRA+.")
    t.add_argument("--config", help="YAML file of config keys (command-line flags override it)")
    t.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_config_flags(t)

    e = sub.add_parser("eval", help="score a model or a trained adapter", allow_abbrev=False)
    e.add_argument("--config", help="YAML file (default: the run's config.yaml next to --adapter)")
    e.add_argument("--adapter", help="folder written by `altlora train` (OUTPUT_DIR/adapter, or OUTPUT_DIR/model)")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--output", help="also write the scores as JSON to this file")
    e.add_argument("--lm-eval", dest="lm_eval", metavar="TASK", help="run an lm-evaluation-harness task instead")
    e.add_argument("--lm-eval-include", dest="lm_eval_include", metavar="DIR", help="folder of extra task YAMLs")
    e.add_argument("--model-path", dest="model_path", help="(with --lm-eval) model folder to score")
    e.add_argument("--limit", type=int, help="(with --lm-eval) at most this many examples")
    e.add_argument("--num-fewshot", dest="num_fewshot", type=int, help="(with --lm-eval) few-shot examples")
    add_config_flags(e, EVAL_FIELDS)

    m = sub.add_parser("merge", help="merge an adapter into its base model and save it", allow_abbrev=False)
    m.add_argument("adapter", help="adapter folder written by `altlora train`")
    m.add_argument("output", help="folder for the merged model")
    m.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUTPUT")

    ls = sub.add_parser("list", help="list methods, models and tasks")
    ls.add_argument("what", nargs="?", default="all", choices=("all", "methods", "models", "tasks"))

    a = sub.add_parser("assets", help="fetch or verify the built-in offline models and data")
    a.add_argument("action", choices=("fetch", "verify", "path"))
    a.add_argument("names", nargs="*", help="asset names (default: all)")
    return p, {"train": set(_FIELDS), "eval": EVAL_FIELDS}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and data are local folders: never reach for a hub
    # transformers 5 deprecates a property that PEFT still reads: nothing the user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from .config import ALIASES
    from .validate import closest

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # from launch.relaunch, where the Python's argparse keeps torchrun's "--"
        argv = argv[1:]
    parser, fields = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        flag = extra[0].split("=")[0]
        hint = closest(flag.lstrip("-"), set(fields.get(args.command, ())) | set(ALIASES))
        parser.error(f"unrecognized argument {flag!r} for `altlora {args.command}`.{hint}")
    try:
        if args.command == "train":
            return cmd_train(args, fields["train"], argv)
        if args.command == "eval":
            return cmd_eval(args, fields["eval"])
        if args.command == "merge":
            return cmd_merge(args)
        if args.command == "list":
            return cmd_list(args)
        return cmd_assets(args)
    except _user_errors() as e:
        if os.environ.get("ALTLORA_DEBUG"):
            raise
        print(f"altlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("altlora: interrupted; checkpoints written so far are complete (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
