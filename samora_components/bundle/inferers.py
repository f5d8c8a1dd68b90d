"""Slice-wise volume inference that keeps labels, not probabilities.

MONAI's ``SliceInferer`` aggregates class scores for the whole volume, a float32 buffer of
``C x X x Y x Z`` values (9 classes on a 512 x 512 x 200 CT: 1.9 GB) before the argmax. A label map
needs one byte per voxel, so :class:`SliceLabelInferer` takes the argmax of each batch of slices as
it comes and memory stays flat in the number of slices.

Slices whose every voxel has the same value (air above and below the body after CT windowing,
zero padding) give the same prediction wherever they sit in the volume, because the network sees
each slice alone: the network runs on one of them per distinct value and the others get its labels.
No label changes. In-plane crops would change what the network sees (it resizes the whole slice to
its input size), so there are none.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from tqdm import tqdm

__all__ = ["SliceLabelInferer"]


class SliceLabelInferer(Inferer):
    """Volume (1, C_in, X, Y, Z) -> labels (1, 1, X, Y, Z), uint8, slice by slice along Z.

    Args:
        sw_batch_size: slices per forward pass.
        reuse_constant_slices: run the network once per distinct constant slice (see the module notes).
        progress: a progress bar over the batches (shown on a terminal only).

    The network maps slices (B, C_in, X, Y) to class scores (B, K, X, Y), K <= 256. After each call,
    ``last_counts`` holds ``(slices the network saw, slices in the volume)``. With ``keep_probabilities``
    set, ``last_probabilities`` also holds the softmax of the scores, (K, X, Y, Z) uint8 (probability
    x 255, rounded: a quarter of float32's memory, steps of 1/255).
    """

    def __init__(self, sw_batch_size: int = 8, reuse_constant_slices: bool = True, progress: bool = False,
                 keep_probabilities: bool = False) -> None:
        super().__init__()
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be at least 1, got {sw_batch_size}")
        self.sw_batch_size = int(sw_batch_size)
        self.reuse_constant_slices = bool(reuse_constant_slices)
        self.progress = bool(progress)
        self.keep_probabilities = bool(keep_probabilities)
        self.last_counts: tuple[int, int] = (0, 0)
        self.last_probabilities: torch.Tensor | None = None

    def slices_to_run(self, volume: torch.Tensor) -> tuple[list[int], dict[int, int]]:
        """Indices of the slices the network must see, and ``{copy: source}`` for the others.

        Shapes: ``volume`` (C_in, X, Y, Z).
        """
        depth = volume.shape[-1]
        if not self.reuse_constant_slices:
            return list(range(depth)), {}
        low, high = volume.amin(dim=(0, 1, 2)).tolist(), volume.amax(dim=(0, 1, 2)).tolist()  # per slice
        run, copies, first_of_value = [], {}, {}
        for k in range(depth):
            if low[k] == high[k]:
                source = first_of_value.setdefault(low[k], k)
                if source != k:
                    copies[k] = source
                    continue
            run.append(k)
        return run, copies

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(f"expected one volume (1, C, X, Y, Z), got {tuple(inputs.shape)}")
        volume = inputs[0].as_tensor() if isinstance(inputs, MetaTensor) else inputs[0]
        _, x, y, depth = volume.shape
        labels = torch.zeros((x, y, depth), dtype=torch.uint8)
        probabilities = None
        self.last_probabilities = None
        run, copies = self.slices_to_run(volume)
        batches = [run[i : i + self.sw_batch_size] for i in range(0, len(run), self.sw_batch_size)]
        for batch in tqdm(batches, desc="slices", unit="batch", leave=False, disable=True if not self.progress else None):
            slices = volume[..., batch].permute(3, 0, 1, 2)  # (B, C_in, X, Y)
            scores = network(slices.contiguous(), *args, **kwargs)  # (B, K, X, Y)
            if scores.shape[0] != len(batch) or tuple(scores.shape[-2:]) != (x, y):
                raise ValueError(f"the network returned {tuple(scores.shape)} for slices {tuple(slices.shape)}")
            labels[..., batch] = scores.argmax(dim=1).to(torch.uint8).permute(1, 2, 0).cpu()
            if self.keep_probabilities:
                if probabilities is None:
                    probabilities = torch.zeros((scores.shape[1], x, y, depth), dtype=torch.uint8)
                scaled = torch.softmax(scores.float(), dim=1).mul_(255.0).round_().to(torch.uint8)
                probabilities[..., batch] = scaled.permute(1, 2, 3, 0).cpu()
        for k, source in copies.items():
            labels[..., k] = labels[..., source]
            if probabilities is not None:
                probabilities[..., k] = probabilities[..., source]
        self.last_probabilities = probabilities
        self.last_counts = (len(run), depth)
        labels = labels[None, None]
        if isinstance(inputs, MetaTensor):
            return MetaTensor(labels, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return labels
