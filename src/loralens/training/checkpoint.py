"""Checkpoints of a training job mid-way: a killed job resumes where it stopped.

Every ``train.checkpoint_every`` optimizer steps ``loop.fit`` writes ONE file (the job's
``checkpoint.safetensors``, :meth:`loralens.core.run_dir.RunDir.checkpoint_path`),
atomically (``core.files.atomic_path``: a temporary name, fsync, rename: a kill while it
is written leaves the previous checkpoint whole), holding what the rest of the fit
depends on:

* the trained parameters in float32 (the masters where the model computes in bfloat16;
  the frozen base is rebuilt from the base model and the seed, bit for bit) and early
  stopping's best parameters, the ones restored at the end;
* the optimizer's state and parameter groups, the schedule's state;
* the RNG states: torch (CPU, and CUDA where it is used), numpy, Python's ``random``. The
  data order needs no generator state: each epoch's order is drawn afresh from
  ``seed * 1000 + epoch`` (``batches.train_batches``), so its position (epoch, micro-batch)
  is enough;
* the position, the running loss sums, early stopping's patience counter and best score,
  and the ``FitResult`` so far (the loop's own JSON, :mod:`loralens.training.loop`).

Tensors are safetensors (no pickle anywhere); the rest is JSON in the file's metadata.
A restarted fit reads the file, checks that it is this job's (:func:`fingerprint`: the
training config, learning rate, seed, method, the training and selection rows, the
trained parameters' names and shapes, the optimizer) and continues from it; on the CPU it
ends with the same weights, bit for bit, as an uninterrupted fit. A file that cannot be
read or belongs to another configuration is logged and ignored (training starts at step
0 and overwrites it). The job removes the file once its ``metrics.json`` is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.core.files import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1                  # bumped when the layout below changes: older files are ignored
META_KEY = "loralens_checkpoint"

# train.* keys that do not change what is computed (threads, compile, checkpointing of
# activations, the checkpoint interval itself): a checkpoint stays valid across them.
# train.precision stays in: a resumed job computes as the killed one did.
NEUTRAL_KEYS = ("checkpoint_every", "threads", "compile", "gradient_checkpointing")


@dataclass
class Loaded:
    """A checkpoint read back: tensors by section (``params``, ``best``, ``optim``, ``rng``)
    and the JSON metadata."""

    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict


# --------------------------------------------------------------------------- identity

def rows_digest(enc) -> str:
    """sha256 of an encoded split's row ids, labels and token ids (``batches.Encoded``)."""
    h = hashlib.sha256()
    h.update(np.asarray(enc.ids, dtype=np.int64).tobytes())
    h.update(np.asarray(enc.labels, dtype=np.int64).tobytes())
    h.update(np.asarray(enc.lengths, dtype=np.int64).tobytes())
    for ids in enc.input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def fingerprint(tc, lr: float, seed: int, opts: dict, train_enc, early_stop_enc,
                params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """What makes a checkpoint this job's: a checkpoint whose fingerprint differs from the
    restarted fit's is ignored. ``params``: the trained parameters by name."""
    train = {k: v for k, v in sorted(tc.__dict__.items()) if k not in NEUTRAL_KEYS}
    return {
        "train": json.loads(json.dumps(train, default=str)),
        "lr": lr, "seed": seed,
        "method": opts.get("method"), "lr_ratio": opts.get("lr_ratio"),
        "group_by_length": opts.get("group_by_length"), "pad_to": opts.get("pad_to"),
        "stop_below_train_loss": opts.get("stop_below_train_loss"),
        "train_rows": [len(train_enc), rows_digest(train_enc)],
        "selection_rows": None if early_stop_enc is None
        else [len(early_stop_enc), rows_digest(early_stop_enc)],
        "params": {n: list(p.shape) for n, p in params.items()},
        "optimizer": type(optimizer).__name__,
    }


# --------------------------------------------------------------------------- state

def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of ``opt.state_dict()``: each state tensor as ``<param>.<key>``."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = []
    for saved, current in zip(meta["param_groups"], opt.param_groups):
        # JSON turned tuples (AdamW's betas) into lists: give them their type back
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v
                       for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of the torch, CUDA, numpy and Python RNG states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                       key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------- the file

def write(path: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Write the checkpoint atomically: every section's tensors as ``<section>/<name>`` in
    one safetensors file, ``meta`` as JSON in its metadata."""
    from safetensors.torch import save_file

    flat = {f"{section}/{name}": t.detach().cpu().contiguous()
            for section, ts in tensors.items() for name, t in ts.items()}
    header = json.dumps({"format": FORMAT, **meta})  # NaN and inf as JSON's extensions
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: header})


def read(path: Path) -> Loaded | None:
    """The checkpoint at ``path``; None where there is none, or it cannot be read (logged)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                section, name = key.split("/", 1)
                tensors.setdefault(section, {})[name] = f.get_tensor(key)
    except Exception as e:  # a damaged file: start over rather than fail the job
        log.warning(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                    "training starts at step 0")
        return None
    if meta.get("format") != FORMAT:
        log.warning(f"checkpoint {path} has format {meta.get('format')!r}, not {FORMAT}; "
                    "training starts at step 0")
        return None
    return Loaded(tensors, meta)


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def remove(path: Path) -> bool:
    """Remove a job's checkpoint (its job finished); True if there was one."""
    path = Path(path)
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed
