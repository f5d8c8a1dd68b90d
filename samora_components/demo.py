"""The ``make demo`` pipeline on the embedded default (synthetic CT phantom, LiteMedSAM backbone).

1. generate the phantom data set (once),
2. fine-tune the SAMed baseline with the CT bundle's train config (quick CPU profile),
3. predict and score the phantom test volumes (Dice/HD95 table, CSV/JSON, bar chart, overlays),
4. segment one NIfTI volume as a user would with ``infer`` and draw an overlay of it.

Everything goes to ``demo_out/`` (the bundle's own ``models/`` is left alone).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .data import ensure_phantom, read_datalist
from .evaluate import format_table
from .inference import BundlePredictor, predict_file
from .io import read_volume
from .plots import choose_slices, overlay_grid
from .workflow import evaluate_bundle, run_config

logger = logging.getLogger("samora")

BUNDLE = "bundles/samora_ct"
DATASET = "data/phantom_ct"


def _train(method: str, out: Path, quick: bool, **overrides) -> Path:
    """Stage-2 training of ``method`` through the bundle config; returns the weights path."""
    ckpt = out / method
    run_config(
        BUNDLE, "train", run_id="training", quick=quick, dataset_dir=DATASET, method=method,
        ckpt_dir=str(ckpt), output_dir=str(out / "runs" / method), **overrides,
    )
    return ckpt / "model.pt"


def _infer_one(weights: Path, image: Path, out: Path) -> tuple[Path, Path]:
    """Segment one volume like ``python -m samora_components infer`` and draw an overlay."""
    predictor = BundlePredictor.from_bundle(BUNDLE, str(weights))
    target = out / "infer" / image.name
    label = predict_file(predictor, image, target)
    volume = np.asarray(read_volume(image).array)
    png = out / "infer" / (target.name.replace(".nii.gz", "") + "_overlay.png")
    zs = choose_slices(label)
    overlay_grid(
        [volume[..., z] for z in zs], [None] * len(zs), [label[..., z] for z in zs], png,
        titles=[f"z = {z}" for z in zs], title=f"SAMed prediction: {image.name}",
    )
    return target, png


def main(out: str = "demo_out", quick: bool = True) -> dict:
    """Run the demo and print where everything went; returns the test summary."""
    start = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    datalist = ensure_phantom(f"{DATASET}/datalist.json", kind="ct", cases=10, unlabeled=8)
    print(f"[1/4] phantom data set: {datalist}", flush=True)
    print("[2/4] fine-tuning the SAMed baseline (litemedsam backbone, quick profile)", flush=True)
    weights = _train("samed", out_dir, quick)
    print("[3/4] evaluating on the phantom test volumes", flush=True)
    eval_dir = out_dir / "samed" / "eval"
    summary = evaluate_bundle(BUNDLE, datalist, "test", str(eval_dir), str(weights), "transunet", BUNDLE)
    print("[4/4] segmenting one NIfTI volume", flush=True)
    test_image = Path(read_datalist(datalist, "test")[0]["image"])
    seg, png = _infer_one(weights, test_image, out_dir)
    minutes = (time.time() - start) / 60
    print()
    print(f"SAMed on the phantom test volumes ({summary['cases']} cases, transunet protocol):")
    print(format_table(summary))
    print()
    print(f"predicted label volume : {seg}")
    print(f"overlay                : {png}")
    print(f"metrics                : {eval_dir / 'metrics.csv'}, {eval_dir / 'summary.json'}")
    print(f"bar chart, overlays    : {eval_dir / 'dice_bar.png'}, {eval_dir / 'overlays'}/")
    print(f"weights                : {weights} (+ model.json)")
    print(f"wall time              : {minutes:.1f} min")
    return summary
