"""Where a bare adapter finds its base model: the one rule ``serve`` and ``predict`` share
(:func:`adapter_base`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loralens.models.artifacts import ADAPTER_CONFIG, ArtifactError
from loralens.models.cards import is_hub_id, read_record
from loralens.models.registry import REGISTRY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseRef:
    """The base model a bare adapter loads onto: ``name`` for ``resolve_model`` (a local
    directory, a registry name or a hub id), its hub ``revision``, and where it was found."""
    name: str
    revision: str | None
    found_in: str  # "--model", "base_model_name_or_path" or "model card"


def adapter_base(path: str | Path, model: str | None = None,
                 revision: str | None = None) -> BaseRef | None:
    """The base of the adapter in ``path``, in this order (``serve`` and ``predict`` both ask
    this one function):

    1. ``model`` (``--model``), with ``revision``;
    2. ``base_model_name_or_path`` of ``adapter_config.json`` where that local directory
       exists here (a hub id recorded there is taken as it is);
    3. the card's record (:func:`loralens.models.cards.read_record`): the base's loralens
       model name where this loralens knows it (for the packaged SmolLM2 that re-converts the
       very same Q4_1 file, checked by its sha256, rather than the hub's different weights),
       else its hub id, each with the recorded revision (``revision`` wins).

    None when the adapter records no base at all; :class:`ArtifactError` when the recorded
    directory is missing and the card names no hub id (the message names ``--model``).
    """
    if model:
        return BaseRef(model, revision, "--model")
    path = Path(path)
    cfg = path / ADAPTER_CONFIG
    recorded = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.is_file() \
        else None
    card = read_record(path).get("base") or {}
    card_rev = revision or card.get("revision")
    if recorded:
        if is_hub_id(recorded):
            return BaseRef(recorded, card_rev, "base_model_name_or_path")
        if Path(recorded).expanduser().is_dir():
            return BaseRef(recorded, revision, "base_model_name_or_path")
    if card.get("name") in REGISTRY:
        return BaseRef(card["name"], card_rev, "model card")
    if card.get("hub_id"):
        if card.get("quantization"):
            log.warning(f"{path}: loading the base from the hub ({card['hub_id']}), but the "
                        f"adapter was trained on other weights: {card['quantization']}")
        return BaseRef(card["hub_id"], card_rev, "model card")
    if recorded:
        raise ArtifactError(f"{path}: the adapter's base {recorded} (base_model_name_or_path) "
                            "does not exist here and its model card names no hub id; give the "
                            "base with --model")
    return None
