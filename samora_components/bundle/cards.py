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

from samora_components.utils import atomic_path, first_line, write_json
from samora_components.networks.samora_net import SAMoraNet

logger = logging.getLogger("samora")

__all__ = ["ARCHITECTURE_KEYS", "apply_card", "card_mismatches", "check_card", "check_weights", "model_card_path", "read_model_card",
           "read_weights", "load_weights", "export_weights"]

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
    try:
        with open(card, encoding="utf-8") as handle:
            content = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"model card {card} is not valid JSON ({first_line(err)})") from None
    if not isinstance(content, dict):
        raise ValueError(f"model card {card} holds a {type(content).__name__}, not an object of architecture keys")
    return content


def read_weights(weights: str | Path) -> dict:
    """The state dict of a weights file (tensors only, never code).

    Raises:
        ValueError: one line naming the file when it is truncated, corrupt or not a state dict.
    """
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises pickle, zip and runtime errors for bad files
        # torch's "Weights only load failed" text suggests loading code from the file: not ours to pass on
        reason = "not a PyTorch tensor file" if "weights only" in first_line(err).lower() else first_line(err)
        raise ValueError(f"{weights}: not a readable weights file, truncated or corrupt? ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights}: not a state dict (a mapping of parameter names to tensors)")
    return state


def load_weights(network: torch.nn.Module, weights: str | Path) -> torch.nn.Module:
    """Load ``weights`` into ``network`` (built from their model card), strictly.

    Raises:
        ValueError: one line naming the file when it is unreadable or does not fit the network:
            weights of another backbone, class count or method than their model card says.
    """
    state = read_weights(weights)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError:
        expected = network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        found = []
        if resized:
            key = resized[0]
            found.append(f"{len(resized)} tensors of another shape (e.g. {key}: {tuple(state[key].shape)} in the file, "
                         f"{tuple(expected[key].shape)} in the network)")
        if missing:
            found.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            found.append(f"{len(unexpected)} unknown (e.g. {unexpected[0]})")
        architecture = getattr(network, "architecture", {})
        described = ", ".join(f"{k}={architecture[k]!r}" for k in ("method", "backbone", "img_size", "num_classes")
                              if k in architecture)
        raise ValueError(f"{weights} does not fit the network its model card {model_card_path(weights)} describes "
                         f"({described}): {'; '.join(found) or 'incompatible tensors'}") from None
    return network


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
    state = read_weights(weights)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    write_json(model_card_path(out), {**card, "weights_dtype": _DTYPES[dtype]})
    logger.info("wrote %s (%s, %.1f MB)", out, _DTYPES[dtype], out.stat().st_size / 1e6)
    return out
