"""Data: volume readers, slice datasets, transforms, datalists of public releases, phantoms."""

from . import datalists, datasets, io, phantom, transforms
from .datasets import SliceDataset, VolumeSlices, read_datalist

__all__ = ["SliceDataset", "VolumeSlices", "read_datalist", "datalists", "datasets", "io", "phantom", "transforms"]
