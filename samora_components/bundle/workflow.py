"""Running bundle configs: the one training/evaluation path shared by bundles and the CLI.

``python -m monai.bundle run training --config_file bundles/samora_ct/configs/train.yaml`` and
``python -m samora_components train --bundle bundles/samora_ct`` both end in
:func:`monai.bundle.run`; this module adds the config-side helpers the YAML files call.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from monai.bundle import run as bundle_run

from samora_components.engines.handlers import process_rank

logger = logging.getLogger("samora")

__all__ = [
    "attach_handlers", "config_files", "evaluate_bundle", "init_distributed", "per_rank_batch", "prepare_run",
    "pretrain", "PRETRAIN_STEPS", "process_rank", "rank_share", "run_config", "world_size",
]


def init_distributed() -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; one node or several) and return
    this process's device: NCCL with GPU ``LOCAL_RANK`` where CUDA exists, gloo on the CPU elsewhere.
    Ranks other than 0 then log warnings and errors only (rank 0 reports the run). Joins once (a
    second call only returns the device)."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        logger.info("process %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), dist.get_backend(), device)
        if dist.get_rank() > 0:
            logging.getLogger().setLevel(logging.WARNING)
    return device


def world_size() -> int:
    """Number of processes of the ``torch.distributed`` process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_share(items: Sequence) -> list:
    """This process's contiguous share of ``items`` (all of them without a process group), e.g. the
    validation volumes each rank evaluates; MONAI's metrics then gather the shares. A list shorter
    than the number of processes is padded by repetition, so that every rank has a share (a rank
    with none would not reach the metric's gathering step and the others would wait for it)."""
    items = list(items)
    world = world_size()
    if world == 1 or not items:
        return items
    if len(items) < world:
        items = [items[i % len(items)] for i in range(world)]
    bounds = [round(i * len(items) / world) for i in range(world + 1)]
    rank = process_rank()
    return items[bounds[rank]:bounds[rank + 1]]


def per_rank_batch(batch_size: int) -> int:
    """Each process's share of the global ``batch_size`` (which stays the recipe's batch, what the
    learning rate is scaled with); it must divide evenly."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes; "
                         f"use a multiple of {world} (batch_size is the global batch of all processes)")
    return batch_size // world


def attach_handlers(engine, handlers: Sequence) -> None:
    """Attach handlers to an engine built directly from Ignite (stage 1), in order; None entries
    (a handler that this process does not run) are skipped."""
    for handler in handlers:
        if handler is None:
            continue
        handler.attach(engine)


def prepare_run(*folders: str) -> None:
    """Create output folders before any handler needs them."""
    for folder in folders:
        os.makedirs(folder, exist_ok=True)


def evaluate_bundle(bundle_root: str, datalist: str, section: str = "test", out: str = "eval",
                    weights: str | None = None, **scoring) -> dict:
    """Run the bundle's ``configs/evaluate.yaml`` (the MONAI evaluator) on a datalist section and
    return its summary.

    Writes ``out/pred/<case>.nii.gz`` and the reports of :func:`samora_components.metrics.reports.evaluate_cases`
    (metrics.csv, summary.csv/json, dice_bar.png, overlays/) into ``out``. ``scoring``: ``protocol``
    (default transunet), ``classes`` (default: the bundle's) and ``label_map``, config keys of that file.
    """
    overrides = {"datalist": str(datalist), "section": section, "output_dir": str(out), **scoring}
    if weights:
        overrides["weights"] = str(weights)
    run_config(bundle_root, "evaluate", run_id="evaluating", **overrides)
    with open(Path(out) / "summary.json") as handle:
        return json.load(handle)


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
