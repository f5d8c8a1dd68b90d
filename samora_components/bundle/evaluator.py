"""Handlers of the MONAI evaluator that ``configs/evaluate.yaml`` runs: predictions written on each
input's own grid (as ``infer`` writes them) and, at the end, the per-case Dice/HD95 reports of
:func:`samora_components.metrics.reports.evaluate_cases` on those files."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Events
from monai.data import decollate_batch
from monai.utils import ImageMetaKey

from samora_components.bundle.inference import output_path, save_like
from samora_components.data.io import VolumeError, check_volume, read_volume, volume_stem
from samora_components.data.transforms import resolve_label_map
from samora_components.metrics.cases import check_protocol
from samora_components.metrics.reports import Case, evaluate_cases, format_table, parse_classes, some_names

__all__ = ["PredictionWriter", "CaseReport"]

_logger = logging.getLogger("samora")


def _decollated(output) -> list:
    """An engine's output as a list of per-item dicts (MONAI engines decollate by default)."""
    if isinstance(output, list):
        return output
    return decollate_batch(output)


class PredictionWriter:
    """Evaluator handler: after each iteration, write every ``pred`` (a label map already inverted
    to the input's grid, channel first) to ``output_dir/<stem>.nii.gz`` with the input file's own
    header and affine, as ``python -m samora_components infer`` does.

    The input file is ``image.meta["filename_or_obj"]``; a prediction whose shape is not the input
    file's is an error (:class:`samora_components.data.io.VolumeError`).
    """

    def __init__(self, output_dir: str | os.PathLike, image_key: str = "image", pred_key: str = "pred") -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.pred_key = pred_key
        self.written: list[Path] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, _engine) -> None:
        self.written = []

    def __call__(self, engine) -> None:
        for item in _decollated(engine.state.output):
            source = Path(str(item[self.image_key].meta[ImageMetaKey.FILENAME_OR_OBJ]))
            pred = item[self.pred_key]
            label = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
            if label.ndim == 4 and label.shape[0] == 1:
                label = label[0]  # channel first -> (X, Y, Z)
            volume = read_volume(source)
            array = check_volume(np.asarray(volume.array), str(source))
            if label.shape != array.shape:
                raise VolumeError(f"{source}: prediction shape {label.shape} differs from the image {array.shape}")
            target = output_path(source, self.output_dir)
            save_like(label.astype(np.uint8).reshape(volume.array.shape), source, target, volume.affine)
            self.written.append(target)


class CaseReport:
    """Evaluator handler: when the run completes, score the written predictions against the label
    files with :func:`evaluate_cases` (Dice and HD95 under ``protocol``) and log the table.

    Args:
        items: the datalist items evaluated (``image`` and ``label`` paths).
        pred_dir: where :class:`PredictionWriter` wrote ``<stem>.nii.gz`` for each image.
        output_dir: report folder (metrics.csv, summary.csv, summary.json, dice_bar.png, overlays/).
        protocol, classes, label_map: as for :func:`evaluate_cases`.
        datalist, section: named in the error for an empty section.

    The summary is kept in ``self.summary`` and ``engine.state.summary``.
    """

    def __init__(self, items: Sequence[Mapping], pred_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 protocol: str = "transunet", classes=None, label_map: str | Mapping[int, int] | None = None,
                 datalist: str | None = None, section: str | None = None) -> None:
        check_protocol(protocol)
        if not items:
            where = f"{datalist} has no '{section}' items" if datalist and section else "no datalist items"
            raise ValueError(f"{where} to evaluate")
        unlabeled = [volume_stem(item["image"]) for item in items if not item.get("label")]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} item(s) without a label cannot be evaluated: {some_names(unlabeled)}")
        parse_classes(classes)  # a bad class list fails before any prediction
        resolve_label_map(label_map)
        self.items = list(items)
        self.pred_dir = Path(pred_dir)
        self.output_dir = Path(output_dir)
        self.protocol = protocol
        self.classes = classes
        self.label_map = label_map
        self.summary: dict | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def cases(self) -> list[Case]:
        """The (prediction, label, image) files of every item."""
        cases = []
        for item in self.items:
            image = Path(item["image"])
            cases.append(Case(volume_stem(image), output_path(image, self.pred_dir), Path(item["label"]), image))
        return cases

    def __call__(self, engine) -> None:
        cases = self.cases()
        self.summary = evaluate_cases(cases, self.protocol, str(self.output_dir), self.classes, self.label_map)
        engine.state.summary = self.summary
        _logger.info("%s:\n%s", self.output_dir, format_table(self.summary))
