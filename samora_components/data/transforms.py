"""SAMora's own dictionary transforms; everything else in the pipelines is a MONAI transform.

* :class:`RemapLabelsd` maps label ids through a table and sends every unlisted id to 0
  (MONAI's ``MapLabelValued`` keeps unlisted ids), with presets for BTCV, AMOS and TotalSegmentator
  label maps onto the 8 Synapse organs (SPEC §7).
* :class:`CTWindowd` applies the CT window (HU [-125, 275] -> [0, 1]) to images that hold HU and
  leaves alone the files that are already windowed (TransUNet Synapse npz/h5), so nothing is scaled
  twice.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange

from samora_components.data.io import INTENSITY_META

__all__ = ["LABEL_MAPS", "RemapLabelsd", "remap_labels", "resolve_label_map", "SYNAPSE_CLASSES", "CTWindowd"]

#: the Synapse multi-organ classes (label id = position): the CT bundle's classes and every remap's target
SYNAPSE_CLASSES = ("background", "spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach", "aorta",
                   "pancreas")

LABEL_MAPS: dict[str, dict[int, int]] = {
    # BTCV (13 organs): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver, 7 stomach,
    # 8 aorta, 11 pancreas; esophagus, IVC, veins and adrenals become background.
    "btcv_to_synapse": {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8},
    # TotalSegmentator "total" task ids.
    "totalseg_to_synapse": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 52: 7, 7: 8},
    # AMOS22 (15 organs): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver, 7 stomach,
    # 8 aorta, 10 pancreas; esophagus, IVC, adrenals, duodenum, bladder and prostate/uterus become background.
    "amos_to_synapse": {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 10: 8},
}


def resolve_label_map(mapping: Mapping[int, int] | str | None) -> dict[int, int] | None:
    """A preset name of :data:`LABEL_MAPS`, a mapping (keys/values cast to int) or None -> table or None."""
    if mapping is None:
        return None
    if isinstance(mapping, str):
        if mapping not in LABEL_MAPS:
            raise ValueError(f"unknown label map {mapping!r}; presets: {', '.join(sorted(LABEL_MAPS))}")
        mapping = LABEL_MAPS[mapping]
    return {int(k): int(v) for k, v in mapping.items()}


def remap_labels(label: np.ndarray | torch.Tensor, mapping: Mapping[int, int]) -> np.ndarray | torch.Tensor:
    """Map integer label values through ``mapping``; unlisted values become 0. Shape is kept."""
    is_tensor = isinstance(label, torch.Tensor)
    values = label.detach().cpu().numpy() if is_tensor else np.asarray(label)
    ints = values.astype(np.int64)
    if ints.size and (ints.min() < 0):
        raise ValueError("label volumes must not contain negative ids")
    top = max(int(ints.max(initial=0)), max(mapping, default=0))
    table = np.zeros(top + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        table[int(src)] = int(dst)
    out = table[ints]
    if not is_tensor:
        return out
    result = torch.as_tensor(out, device=label.device)
    if isinstance(label, MetaTensor):
        return MetaTensor(result, meta=label.meta, applied_operations=label.applied_operations)
    return result


class RemapLabelsd(MapTransform):
    """Remap label ids with a table or a preset name of :data:`LABEL_MAPS`.

    Args:
        keys: keys of label arrays (any shape).
        mapping: dict ``{source_id: target_id}`` or a preset name; ``None`` leaves labels as they are.
    """

    def __init__(self, keys: KeysCollection, mapping: Mapping[int, int] | str | None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mapping = resolve_label_map(mapping)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.mapping is None:
            return d
        for key in self.key_iterator(d):
            d[key] = remap_labels(d[key], self.mapping)
        return d


class CTWindowd(MapTransform):
    """Clip CT intensities to a HU window and scale them to [0, 1] (SPEC §7), unless the image is
    already windowed.

    Args:
        keys: image keys.
        a_min / a_max: the window in HU (default [-125, 275]).
        source: what the images hold: ``"auto"`` (ask the file: TransUNet Synapse ``.npz`` /
            ``.npy.h5`` files are marked ``scaled01`` by SAMora's readers, everything else is HU),
            ``"hu"`` (always window) or ``"scaled01"`` (never window).
    """

    SOURCES = ("auto", "hu", "scaled01")

    def __init__(self, keys: KeysCollection, a_min: float = -125.0, a_max: float = 275.0, source: str = "auto",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if source not in self.SOURCES:
            raise ValueError(f"intensity source must be one of {', '.join(self.SOURCES)}, got {source!r}")
        self.source = source
        self.window = ScaleIntensityRange(a_min, a_max, 0.0, 1.0, clip=True)

    def _windowed(self, image) -> bool:
        if self.source != "auto":
            return self.source == "scaled01"
        meta = image.meta if isinstance(image, MetaTensor) else {}
        return meta.get(INTENSITY_META) == "scaled01"

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not self._windowed(d[key]):
                d[key] = self.window(d[key])
        return d
