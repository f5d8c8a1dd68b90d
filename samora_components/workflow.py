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
    "attach_handlers", "expert_files", "prepare_run", "pretrain", "PRETRAIN_STEPS", "report_training", "run_config", "config_files", "evaluate_bundle", "model_card_path", "read_model_card", "write_json",
    "MODEL_CARD_KEYS", "export_weights",
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


def attach_handlers(engine, handlers: Sequence) -> None:
    """Attach handlers to an engine built directly from Ignite (stage 1), in order."""
    for handler in handlers:
        handler.attach(engine)


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
    label_map: str | None = None,
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
    summary = evaluate_cases(cases, protocol, out, classes or bundle_root, label_map)
    logger.info("%s (%s protocol, %d cases):\n%s", section, protocol, len(cases), format_table(summary))
    return summary


def _names(value: str | Sequence[str] | None) -> list[str]:
    """``"la,la_cpu"`` or ``("la", "la_cpu")`` -> ``["la", "la_cpu"]``."""
    if not value:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def config_files(bundle: str, name: str | Sequence[str], quick: bool = False,
                 profile: str | Sequence[str] | None = None) -> list[str]:
    """Config files of a bundle workflow, merged in order: ``configs/<name>.yaml`` (one name or a
    list, e.g. ``["pretrain", "pretrain_image"]``), then each profile ``configs/<p>.yaml`` (``quick``
    first when ``quick``; e.g. ``la,la_cpu`` for the MR bundle), and for stage 1 each profile's
    ``configs/<p>_pretrain.yaml`` when it exists."""
    configs = Path(bundle) / "configs"
    names = [name] if isinstance(name, str) else list(name)
    files = [configs / f"{n}.yaml" for n in names]
    for extra in (["quick"] if quick else []) + _names(profile):
        files.append(configs / f"{extra}.yaml")
        if names[0] == "pretrain" and (configs / f"{extra}_pretrain.yaml").is_file():
            files.append(configs / f"{extra}_pretrain.yaml")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config not found: {', '.join(missing)}")
    return [str(f) for f in files]


def run_config(bundle: str, name: str | Sequence[str], run_id: str = "run", quick: bool = False,
               profile: str | Sequence[str] | None = None, **overrides) -> None:
    """Run the merged config files of ``bundle`` (see :func:`config_files`) with ``overrides``
    (config ids -> values)."""
    bundle = str(Path(bundle))
    files = config_files(bundle, name, quick, profile)
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


#: stage-1 runs in the order ``--level all`` performs them: config file -> what it trains
PRETRAIN_STEPS = {
    "cpt_simclr": "SimCLRv2 teacher, continual pre-training",
    "cpt_mae": "MAE teacher, continual pre-training",
    "image": "image-level expert (distillation from SimCLRv2)",
    "patch": "patch-level expert (distillation from MAE)",
    "pixel": "pixel-level expert (denoising autoencoder)",
}
_TEACHER_KEY = {"image": "simclr_checkpoint", "patch": "mae_checkpoint", "cpt_simclr": "simclr_init_checkpoint", "cpt_mae": "mae_init_checkpoint"}


def pretrain(
    bundle: str,
    level: str = "all",
    quick: bool = False,
    teacher_checkpoint: str | None = None,
    simclr_checkpoint: str | None = None,
    mae_checkpoint: str | None = None,
    profile: str | Sequence[str] | None = None,
    **overrides,
) -> list[str]:
    """Stage 1 of a bundle: ``level`` is image, patch, pixel, cpt_simclr, cpt_mae, cpt (both CPT
    runs) or all (both CPT runs, then the three experts). Returns the steps run.

    ``teacher_checkpoint`` is the teacher a single level starts from (the official SimCLRv2 / MAE
    weights for cpt_* levels, a teacher to distil from for image/patch); ``simclr_checkpoint`` and
    ``mae_checkpoint`` give the official starting weights of CPT for ``cpt``/``all``.
    """
    groups = {"all": list(PRETRAIN_STEPS), "cpt": ["cpt_simclr", "cpt_mae"]}
    steps = groups.get(level, [level])
    if any(step not in PRETRAIN_STEPS for step in steps):
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join([*PRETRAIN_STEPS, 'cpt', 'all'])}")
    if teacher_checkpoint is not None:
        if len(steps) > 1 or steps[0] not in _TEACHER_KEY:
            raise ValueError("--teacher-checkpoint goes with one of the levels image, patch, cpt_simclr, cpt_mae; "
                             "use --simclr-checkpoint / --mae-checkpoint with cpt or all")
        overrides[_TEACHER_KEY[steps[0]]] = teacher_checkpoint
    for key, path in (("simclr_init_checkpoint", simclr_checkpoint), ("mae_init_checkpoint", mae_checkpoint)):
        if path is not None:
            overrides.setdefault(key, path)
    for given in [v for k, v in overrides.items() if k.endswith("checkpoint") and isinstance(v, str) and v]:
        if not Path(given).is_file():
            raise FileNotFoundError(f"checkpoint not found: {given}")
    for index, step in enumerate(steps, 1):
        logger.info("stage 1 [%d/%d] %s: %s", index, len(steps), step, PRETRAIN_STEPS[step])
        config = step if step.startswith("cpt_") else f"pretrain_{step}"
        run_config(bundle, ["pretrain", config], run_id="training", quick=quick, profile=profile, **overrides)
    return steps


MODEL_CARD_KEYS = (
    "method", "backbone", "backbone_checkpoint", "img_size", "num_classes", "class_names", "lora_rank",
    "expert_levels", "fusion", "fusion_order", "fusion_width", "fusion_heads",
)


def model_card_path(weights: str | Path) -> Path:
    """The card that describes a weights file: ``models/model.pt`` -> ``models/model.json``."""
    weights = Path(weights)
    return weights if weights.suffix == ".json" else weights.with_suffix(".json")


def read_model_card(path: str | Path) -> dict:
    """The architecture a weights file (or its card, given directly) was trained with; ``{}`` when
    there is no card, so that a config can still be parsed without trained weights."""
    card = model_card_path(path)
    if not card.is_file():
        return {}
    with open(card) as handle:
        return json.load(handle)


def write_json(path: str | Path, content: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as handle:
        json.dump(content, handle, indent=2, default=str)
    tmp.replace(path)


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def export_weights(weights: str | Path, out: str | Path | None = None, dtype: str = "fp16") -> Path:
    """Write a trained state dict with its floating-point tensors stored in ``dtype`` (``fp16`` halves
    the file; loading casts back to the network's dtype) and its model card beside it.

    ``out`` defaults to ``weights`` (rewritten in place). Returns the written weights path.
    """
    import torch

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(out)
    write_json(model_card_path(out), {**card, "weights_dtype": _DTYPES[dtype]})
    logger.info("wrote %s (%s, %.1f MB)", out, _DTYPES[dtype], out.stat().st_size / 1e6)
    return out
