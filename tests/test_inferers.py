"""SliceLabelInferer: the same labels as MONAI's SliceInferer + argmax, in bounded memory."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from samora_components.bundle.inferers import SliceLabelInferer


class _Counting(torch.nn.Module):
    """A slice network (B, 1, X, Y) -> (B, 3, X, Y) whose scores depend on every voxel of the slice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.conv(x) + x.mean(dim=(1, 2, 3), keepdim=True)


def _volume() -> torch.Tensor:
    """(1, 1, 12, 10, 9): slices 0, 1, 7 and 8 constant (two values), the rest random."""
    torch.manual_seed(1)
    vol = torch.randn(1, 1, 12, 10, 9)
    vol[..., 0] = -1.0
    vol[..., 1] = -1.0
    vol[..., 7] = 0.5
    vol[..., 8] = -1.0
    return vol


def _reference(vol: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
    scores = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=4)(vol, net)
    return scores.argmax(1, keepdim=True).to(torch.uint8)


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_labels_equal_slice_inferer_argmax(reuse, batch):
    vol, net = _volume(), _Counting()
    with torch.no_grad():
        expected = _reference(vol, net)
        inferer = SliceLabelInferer(sw_batch_size=batch, reuse_constant_slices=reuse)
        labels = inferer(vol, net)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 1, 12, 10, 9)
    assert torch.equal(labels, expected)
    # constant slices of one value run once: -1 (slices 0, 1, 8) and 0.5 (slice 7) -> 2 of 4 run
    assert inferer.last_counts == ((7, 9) if reuse else (9, 9))


def test_constant_slices_are_seen_once_per_value():
    vol, net = _volume(), _Counting()
    with torch.no_grad():
        SliceLabelInferer(sw_batch_size=3)(vol, net)
    assert net.seen == 7


def test_meta_is_kept():
    vol = MetaTensor(_volume(), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])), meta={"filename_or_obj": "x.nii.gz"})
    with torch.no_grad():
        labels = SliceLabelInferer()(vol, _Counting())
    assert isinstance(labels, MetaTensor)
    assert torch.equal(labels.affine, vol.affine) and labels.meta["filename_or_obj"] == "x.nii.gz"


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_batch_size_is_refused(bad):
    with pytest.raises(ValueError, match="sw_batch_size"):
        SliceLabelInferer(sw_batch_size=bad)


def test_wrong_input_or_network_output_is_a_clear_error():
    with pytest.raises(ValueError, match="one volume"):
        SliceLabelInferer()(torch.zeros(2, 1, 4, 4, 3), _Counting())
    with pytest.raises(ValueError, match="returned"):
        SliceLabelInferer()(torch.zeros(1, 1, 4, 4, 3), lambda x: torch.zeros(x.shape[0], 2, 2, 2))


@pytest.mark.parametrize("reuse", [True, False])
def test_kept_probabilities_are_the_softmax_of_slice_inferer(reuse):
    vol, net = _volume(), _Counting()
    with torch.no_grad():
        scores = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=4)(vol, net)
        inferer = SliceLabelInferer(sw_batch_size=3, reuse_constant_slices=reuse, keep_probabilities=True)
        inferer(vol, net)
    kept = inferer.last_probabilities
    assert kept.dtype == torch.uint8 and kept.shape == (3, 12, 10, 9)
    assert (kept.float() / 255 - torch.softmax(scores[0], 0)).abs().max() <= 0.5 / 255 + 1e-6
    inferer.keep_probabilities = False
    with torch.no_grad():
        inferer(vol, net)
    assert inferer.last_probabilities is None  # memory is only spent when asked for
