"""The ``make demo`` pipeline on the embedded default (synthetic CT phantom, LiteMedSAM backbone).

1. generate the phantom data set (once),
2. stage 1, quick: continual pre-training of tiny teachers and the three LoRA experts,
3. stage 2, quick: fine-tune the SAMed baseline and SAMora with the CT bundle's train config,
4. predict and score the phantom test volumes with both (Dice/HD95 table, CSV/JSON, bar chart, overlays),
5. segment one NIfTI volume with SAMora as a user would with ``infer`` and draw an overlay of it.

Everything goes to ``demo_out/``. If the CT bundle has no trained model yet, the demo's SAMora
model is also installed as ``bundles/samora_ct/models/model.pt`` (+ ``model.json``), so that
``infer --bundle bundles/samora_ct`` and the MONAI Label server work right away; an existing model
there is never replaced.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from samora_components.apps.bench import matmul_peak
from samora_components.bundle.inference import BundlePredictor, predict_file
from samora_components.bundle.workflow import evaluate_bundle, pretrain, run_config
from samora_components.data.datasets import read_datalist
from samora_components.data.io import read_volume
from samora_components.data.phantom import generate
from samora_components.metrics.plots import choose_slices, overlay_grid
from samora_components.metrics.reports import format_table
from samora_components.networks.precision import resolve_precision

logger = logging.getLogger("samora")

BUNDLE = "bundles/samora_ct"
DATASET = "data/phantom_ct"
METHODS = ("samed", "samora")

# The quick profile's cost, measured with `make demo` on the reference CPU (docs/results.md §1): the
# share of the wall time each step took, the whole wall time and the fp32 matmul rate there.
STEP_SHARES = {"stage1": 0.11, "samed": 0.37, "samora": 0.48, "evaluate": 0.03, "infer": 0.01}
REFERENCE_SECONDS = 775.0
REFERENCE_GFLOPS = 125.0


class RemainingTime:
    """Expected remaining demo time: first from this machine's measured matmul rate, in the precision
    the demo will run in, against the reference machine's fp32 rate; then from the time the finished
    steps actually took."""

    def __init__(self) -> None:
        self.start = time.time()
        self.done = 0.0
        dtype = torch.bfloat16 if resolve_precision("auto", "cpu").precision == "bf16" else torch.float32
        rate = max(matmul_peak(dtype, size=1024, repeats=5) for _ in range(3))  # best of 3: robust to a busy moment
        self.first_guess = REFERENCE_SECONDS * REFERENCE_GFLOPS / max(rate, 1e-3)

    def finished(self, step: str) -> None:
        self.done += STEP_SHARES[step]

    def __str__(self) -> str:
        if self.done <= 0:
            left = self.first_guess
        else:
            elapsed = time.time() - self.start
            left = elapsed / self.done * max(0.0, 1.0 - self.done)
        return f"about {left / 60:.1f} min left"


def _train(method: str, out: Path, quick: bool) -> Path:
    """Stage-2 training of ``method`` through the bundle config; returns the weights path."""
    ckpt = out / method
    run_config(
        BUNDLE, "train", run_id="training", quick=quick, dataset_dir=DATASET, method=method,
        ckpt_dir=str(ckpt), output_dir=str(out / "runs" / method), expert_dir=str(out / "experts"),
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
        titles=[f"z = {z}" for z in zs], title=f"SAMora prediction: {image.name}",
    )
    return target, png


def _install(weights: Path) -> str:
    """Copy the demo model into the bundle's models/ when it has none; say what happened."""
    models = Path(BUNDLE) / "models"
    if (models / "model.pt").exists():
        return f"kept the existing {models / 'model.pt'}"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights.with_suffix(".json"), models / "model.json")
    shutil.copy2(weights, models / "model.pt")
    return f"installed as {models / 'model.pt'} (phantom-trained: for trying the tools, not for real CT)"


def _comparison(summaries: dict[str, dict], minutes: dict[str, float]) -> str:
    names = list(next(iter(summaries.values()))["classes"])
    width = max(len(n) for n in names + ["mean Dice", "mean HD95 (vox)"])
    lines = [f"{'':<{width}}  " + "  ".join(f"{m:>8}" for m in summaries)]
    for name in names:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{s['classes'][name]['dice']:>8.4f}" for s in summaries.values()))
    lines.append(f"{'mean Dice':<{width}}  " + "  ".join(f"{s['mean']['dice']:>8.4f}" for s in summaries.values()))
    lines.append(f"{'mean HD95 (vox)':<{width}}  " + "  ".join(f"{s['mean']['hd95']:>8.2f}" for s in summaries.values()))
    lines.append(f"{'training (min)':<{width}}  " + "  ".join(f"{minutes[m]:>8.1f}" for m in summaries))
    return "\n".join(lines)


def main(out: str = "demo_out", quick: bool = True) -> dict:
    """Run the demo and print where everything went; returns the test summaries by method."""
    start = time.time()
    eta = RemainingTime()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    datalist = f"{DATASET}/datalist.json"
    if not Path(datalist).is_file():
        generate(DATASET, kind="ct", cases=10, seed=0, unlabeled=8)
    print(f"[1/5] phantom data set: {datalist}", flush=True)
    print(f"[2/5] stage 1: teachers and the image/patch/pixel experts (quick; {eta})", flush=True)
    pretrain(BUNDLE, "all", quick=quick, dataset_dir=DATASET, expert_dir=str(out_dir / "experts"),
             teacher_dir=str(out_dir / "teachers"), output_dir=f"$'{out_dir}/runs/pretrain_' + @level")
    eta.finished("stage1")
    weights, summaries, minutes = {}, {}, {}
    for method in METHODS:
        print(f"[3/5] stage 2: {method} (litemedsam backbone, quick profile; {eta})", flush=True)
        began = time.time()
        weights[method] = _train(method, out_dir, quick)
        minutes[method] = (time.time() - began) / 60
        eta.finished(method)
    print(f"[4/5] evaluating both on the phantom test volumes ({eta})", flush=True)
    for method in METHODS:
        summaries[method] = evaluate_bundle(BUNDLE, datalist, "test", str(out_dir / method / "eval"), str(weights[method]),
                                            protocol="transunet")
    eta.finished("evaluate")
    print(f"[5/5] segmenting one NIfTI volume with SAMora ({eta})", flush=True)
    test_image = Path(read_datalist(datalist, "test")[0]["image"])
    seg, png = _infer_one(weights["samora"], test_image, out_dir)
    installed = _install(weights["samora"])
    print()
    print(f"SAMora on the phantom test volumes ({summaries['samora']['cases']} cases):")
    print(format_table(summaries["samora"]))
    print()
    print("SAMed vs SAMora, Dice per organ (same epochs, same data):")
    print(_comparison(summaries, minutes))
    print()
    eval_dir = out_dir / "samora" / "eval"
    print(f"predicted label volume : {seg}")
    print(f"overlay                : {png}")
    print(f"metrics                : {eval_dir / 'metrics.csv'}, {eval_dir / 'summary.json'} (SAMed: {out_dir / 'samed' / 'eval'})")
    print(f"bar chart, overlays    : {eval_dir / 'dice_bar.png'}, {eval_dir / 'overlays'}/")
    print(f"experts                : {out_dir / 'experts'}/lora_{{image,patch,pixel}}.safetensors")
    print(f"weights                : {weights['samora']} (+ model.json); bundle model: {installed}")
    print(f"wall time              : {(time.time() - start) / 60:.1f} min")
    return summaries
