"""Model cards: the JSON file beside trained weights that records the network they fit.

``models/model.pt`` is described by ``models/model.json`` (written by training, read by inference,
``export`` and the MONAI Label server); :meth:`samora_components.networks.SAMoraNet.from_card`
builds the network a card describes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from samora_components.utils import atomic_path, write_json
from samora_components.networks.samora_net import SAMoraNet

logger = logging.getLogger("samora")

__all__ = ["ARCHITECTURE_KEYS", "apply_card", "card_mismatches", "check_card", "check_weights", "model_card_path", "read_model_card",
           "export_weights"]

#: model-card keys that describe the network (``SAMoraNet``'s own list, less the training-only
#: ``scratch_levels``); ``inference.yaml`` writes each out as a config key
ARCHITECTURE_KEYS = tuple(key for key in SAMoraNet.CARD_ARGS if key != "scratch_levels")
#: keys that only matter for SAMora networks
_SAMORA_KEYS = ("expert_levels", "fusion", "fusion_order", "fusion_width", "fusion_heads", "gate_init", "fusion_norm")


def _plain(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value) if isinstance(value, (int, float)) else value


def card_mismatches(network: torch.nn.Module, card: dict) -> list[str]:
    """``key=card value (config: network value)`` for every architecture key where a model card and a
    built network disagree (keys the card lacks are not checked; the frozen backbone is compared by
    its SHA-256, not by the path it was read from)."""
    arch = network.architecture
    keys = [k for k in ARCHITECTURE_KEYS if k in card and k != "backbone_checkpoint"]
    if arch["method"] != "samora" and card.get("method") == arch["method"]:
        keys = [k for k in keys if k not in _SAMORA_KEYS]
    if network.attention_layout != "tinyvit":  # fitted windows exist only in TinyViT backbones
        keys = [k for k in keys if k != "fit_windows"]
    found = [f"{k}={card[k]!r} (config: {arch[k]!r})" for k in keys if _plain(card[k]) != _plain(arch[k])]
    if card.get("backbone_sha256") and card["backbone_sha256"] != network.backbone_sha256:
        found.append("backbone weights (SHA-256 differs: set backbone_checkpoint to the file the card names)"
                     if network.backbone_sha256 else "backbone weights (the config builds a random backbone)")
    return found


def check_card(network: torch.nn.Module, card: dict, weights: str | Path | None = None) -> torch.nn.Module:
    """Return ``network`` when the model card of ``weights`` agrees with it, else raise ``ValueError``
    naming the keys that differ. An empty card (no trained weights yet) passes."""
    found = card_mismatches(network, card) if card else []
    if found:
        where = model_card_path(weights) if weights else "the model card"
        raise ValueError(f"{where} does not describe the network of inference.yaml: {', '.join(found)}; "
                         "set those keys (python -m samora_components infer sets them from the card)")
    return network


def apply_card(parser, card: dict) -> None:
    """Set every architecture key a model card records on a parsed ``inference.yaml`` (a MONAI
    ``ConfigParser``), so that the network built fits the weights the card describes."""
    for key in ARCHITECTURE_KEYS:
        if key in card:
            parser[key] = card[key]


def model_card_path(weights: str | Path) -> Path:
    """The card that describes a weights file: ``models/model.pt`` -> ``models/model.json``."""
    weights = Path(weights)
    return weights if weights.suffix == ".json" else weights.with_suffix(".json")


def check_weights(weights: str | Path) -> Path:
    """Return ``weights`` when the file and its model card (``W.pt`` -> ``W.json``) both exist.

    Raises:
        FileNotFoundError: one line naming the missing file.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights} (train the bundle first or pass --weights)")
    card = model_card_path(weights)
    if not card.is_file():
        raise FileNotFoundError(
            f"no model card {card} beside {weights}: training writes it; it says which network the weights fit")
    return weights


def read_model_card(path: str | Path) -> dict:
    """The architecture a weights file (or its card, given directly) was trained with; ``{}`` when
    there is no card, so that a config can still be parsed without trained weights."""
    card = model_card_path(path)
    if not card.is_file():
        return {}
    with open(card) as handle:
        return json.load(handle)


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def export_weights(weights: str | Path, out: str | Path | None = None, dtype: str = "fp16") -> Path:
    """Write a trained state dict with its floating-point tensors stored in ``dtype`` (``fp16`` halves
    the file; loading casts back to the network's dtype) and its model card beside it.

    ``out`` defaults to ``weights`` (rewritten in place). Returns the written weights path.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    weights = Path(weights)
    out = Path(out) if out else weights
    card = read_model_card(weights)
    if not card:
        raise FileNotFoundError(f"no model card {model_card_path(weights)} beside {weights}")
    target = getattr(torch, _DTYPES[dtype])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    write_json(model_card_path(out), {**card, "weights_dtype": _DTYPES[dtype]})
    logger.info("wrote %s (%s, %.1f MB)", out, _DTYPES[dtype], out.stat().st_size / 1e6)
    return out
