"""Running bundle configs: the one training/evaluation path shared by bundles and the CLI.

``python -m monai.bundle run training --config_file bundles/samora_ct/configs/train.yaml`` and
``python -m samora_components train --bundle bundles/samora_ct`` both end in
:func:`monai.bundle.run`; this module adds the config-side helpers the YAML files call.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.bundle import run as bundle_run

logger = logging.getLogger("samora")

__all__ = [
    "expert_files", "prepare_run", "report_training", "run_config", "config_files", "evaluate_bundle", "read_model_card", "write_json",
    "MODEL_CARD_KEYS",
]


def expert_files(method: str, experts: Mapping[str, str] | None, levels: Sequence[str]) -> dict[str, str] | None:
    """Expert files to load for ``method`` (only ``samora`` uses them).

    Levels whose file does not exist are left out with a warning: their expert keeps its initial
    zero update (the network still trains fusion and decoder).
    """
    if method != "samora":
        return None
    found = {}
    for level in levels:
        path = (experts or {}).get(level)
        if path and Path(path).is_file():
            found[level] = str(path)
        else:
            logger.warning("no %s-level expert at %s: run stage 1 (pretrain) first; its delta stays zero", level, path)
    return found


def prepare_run(*folders: str) -> None:
    """Create output folders before any handler needs them."""
    for folder in folders:
        os.makedirs(folder, exist_ok=True)


def report_training(evaluator, model_path: str) -> None:
    """Log the best validation metric and where the weights are."""
    state = evaluator.state
    logger.info("best val_mean_dice %.4f at epoch %s; weights: %s", state.best_metric, state.best_metric_epoch, model_path)


def evaluate_bundle(
    bundle_root: str,
    datalist: str,
    section: str = "test",
    out: str = "eval",
    weights: str | None = None,
    protocol: str = "transunet",
    classes: str | None = None,
) -> dict:
    """Predict a datalist section with the bundle's inference config and score it.

    Writes ``out/pred/<case>.nii.gz`` and the reports of :func:`samora_components.evaluate.evaluate_cases`
    (metrics.csv, summary.csv/json, dice_bar.png, overlays/) into ``out``.
    """
    from .data import read_datalist
    from .evaluate import evaluate_cases, format_table
    from .inference import BundlePredictor, predict_datalist

    items = read_datalist(datalist, section)
    if not items:
        raise ValueError(f"{datalist} has no '{section}' items to evaluate")
    predictor = BundlePredictor.from_bundle(bundle_root, weights)
    cases = predict_datalist(predictor, items, Path(out) / "pred")
    summary = evaluate_cases(cases, protocol, out, classes or bundle_root)
    logger.info("%s (%s protocol, %d cases):\n%s", section, protocol, len(cases), format_table(summary))
    return summary


def config_files(bundle: str, name: str, quick: bool = False) -> list[str]:
    """Config files for a bundle workflow, plus ``quick.yaml`` for the CPU quick profile."""
    configs = Path(bundle) / "configs"
    files = [configs / f"{name}.yaml"]
    if quick:
        files.append(configs / "quick.yaml")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config not found: {', '.join(missing)}")
    return [str(f) for f in files]


def run_config(bundle: str, name: str, run_id: str = "run", quick: bool = False, **overrides) -> None:
    """Run ``configs/<name>.yaml`` of ``bundle`` with ``overrides`` (config ids -> values)."""
    bundle = str(Path(bundle))
    files = config_files(bundle, name, quick)
    meta = Path(bundle) / "configs" / "metadata.json"
    logging_conf = Path(bundle) / "configs" / "logging.conf"
    overrides.setdefault("bundle_root", bundle)
    bundle_run(
        run_id=run_id,
        config_file=files,
        meta_file=str(meta) if meta.is_file() else None,
        logging_file=str(logging_conf) if logging_conf.is_file() else None,
        **overrides,
    )


MODEL_CARD_KEYS = (
    "method", "backbone", "backbone_checkpoint", "img_size", "num_classes", "class_names", "lora_rank",
    "expert_levels", "fusion", "fusion_order", "fusion_width", "fusion_heads",
)


def read_model_card(path: str) -> dict:
    """The architecture a ``model.pt`` was trained with (``{}`` when there is no card)."""
    if not Path(path).is_file():
        return {}
    with open(path) as handle:
        return json.load(handle)


def write_json(path: str | Path, content: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as handle:
        json.dump(content, handle, indent=2, default=str)
    tmp.replace(path)
