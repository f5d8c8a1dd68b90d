"""Command line: ``python -m samora_components <command> [--option value ...]``.

Commands:
  phantom   write a synthetic CT/MR phantom data set with its datalist
  convert   write the datalist of a public release folder (LA, PROMISE12, Synapse, AMOS, TotalSegmentator)
  pretrain  stage 1: continual pre-training of the teachers and the three LoRA experts
  train     stage-2 training of a bundle (SAMed or SAMora), same path as ``monai.bundle run training``
  lovo      leave-one-volume-out check: train on all volumes but one, score the one left out, per organ
  evaluate  Dice/HD95 of predicted label volumes against ground truth (transunet | spacing protocol)
  infer     segment NIfTI/MetaImage/h5 volumes with a bundle's inference config
  bench     SAMed vs SAMora latency, FLOPs and parameters as one JSON line
  bench-precision  label agreement of a trained bundle in bf16 vs fp32 on a datalist section (JSON)
  bench-infer      infer end to end vs the model alone on the same slices, with CPU user/system time (JSON)
  bench-engines    seconds per volume and label agreement of each inference engine (JSON)
  export    store trained weights with fp16 tensors beside their model card, or as ONNX / TorchScript
  demo      the whole quick pipeline on the phantom (what ``make demo`` runs)

``python -m samora_components <command> --help`` lists a command's options.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire

from samora_components.apps import bench, crossval, demo
from samora_components.bundle import cards, export, inference, workflow
from samora_components.data import datalists, phantom
from samora_components.metrics import reports
from samora_components.utils import first_line, keep_freed_memory, user_error


def _phantom(out: str, kind: str = "ct", cases: int = 10, seed: int = 0, unlabeled: int = 0) -> None:
    """Write a synthetic phantom data set (NIfTI + datalist.json) to OUT."""
    phantom.main(out=out, kind=kind, cases=cases, seed=seed, unlabeled=unlabeled)


def _evaluate(pred: str, label: str, protocol: str = "transunet", out: str = "eval", classes: str | None = None,
              image: str | None = None, label_map: str | None = None) -> None:
    """Evaluate predictions PRED against labels LABEL (files or folders matched by name);
    --label_map btcv_to_synapse|amos_to_synapse|totalseg_to_synapse remaps the labels' ids first."""
    summary = reports.evaluate(pred, label, protocol=protocol, out=out, classes=classes, image=image, label_map=label_map)
    reports.print_report(summary, out, image)


def _infer(bundle: str, input: str, output: str, weights: str | None = None, overwrite: bool = False, batch: int | None = None,
           precision: str | None = None, engine: str = "auto", overlay: bool = False,
           save_probabilities: bool = False) -> None:
    """Segment INPUT (file or folder) with BUNDLE; write label volumes to OUTPUT. --precision auto
    (default: bf16 only on hardware with native bf16, else fp32) | fp32 | bf16; --batch N slices per
    forward pass (default: the bundle's inference.yaml); --engine auto (default: on a CPU in fp32
    with at least 3 volumes, times one batch under OpenVINO and PyTorch eager once per model and CPU,
    keeps the answer in ~/.cache/samora with OpenVINO's export, and runs the faster; else eager: one
    line says which and why) | eager | openvino | compile | torchscript | onnxruntime (the last two
    need `export --format` first); SAMORA_ENGINE=eager|openvino|... fixes what auto means.

    Each finished volume prints the volume of every class in mL. --overlay also writes
    OUTPUT/<name>_overlay.png (axial and coronal slices with the labels painted over the image, as
    the model saw it); --save_probabilities writes OUTPUT/<name>_probabilities.nii.gz, the per-class
    softmax on the input grid (4-D, X x Y x Z x classes; stored as uint8 with scale 1/255, since
    NIfTI has no float16: readers return floats in [0, 1]).

    Stopped at any point (Ctrl-C, kill, full disk), a run leaves only complete label files in OUTPUT
    (each appears when written in full); run the same command again without --overwrite to skip the
    volumes already done and segment the rest. OUTPUT must not be (or lie inside) an input folder.
    A bad volume gets one `error:` line (the others are still written; exit status 1); one that
    stops the whole run (missing bundle, weights that do not fit their model card, unwritable
    OUTPUT) one `error:` line and exit status 2. Volumes above SAMORA_MAX_VOXELS voxels (default
    2e9) are refused from their header, before they are read."""
    inference.main(bundle=bundle, input=input, output=output, weights=weights, overwrite=overwrite, batch=batch,
                   precision=precision, engine=engine, overlay=overlay, save_probabilities=save_probabilities)


def _train(bundle: str = "bundles/samora_ct", quick: bool = False, profile: str | None = None, **overrides) -> None:
    """Train BUNDLE (configs/train.yaml [+ quick.yaml] [+ --profile la,la_cpu: configs/la.yaml, ...]);
    extra --key value pairs override the config."""
    workflow.run_config(bundle, "train", run_id="training", quick=quick, profile=profile, **overrides)


def _convert(kind: str, src: str, out: str | None = None, validation: int = 0, labeled: int | None = None,
             modality: str = "ct", append: bool = False, evaluation: int = 0) -> None:
    """Write DATALIST (default SRC/datalist.json) for --kind la|promise12|synapse|amos|totalseg. LA and
    PROMISE12: --labeled N scans train (the few-shot budget: 4 / 3), --validation N further labeled
    scans from outside the budget validate, --evaluation N scans after those go to test (scored only,
    not in the stage-1 pool). CT kinds write Synapse-8 label copies when the source uses
    other ids (--modality all keeps AMOS MR cases). --append True adds the cases to the datalist
    already at OUT (e.g. AMOS slabs, then a TotalSegmentator subject: one CT training set)."""
    datalists.main(kind, src, out, validation, labeled, modality=modality, append=append, evaluation=evaluation)


def _lovo(bundle: str, datalist: str, out: str, methods: str = "samed,samora", profile: str | None = None,
          pretrain: bool = True, folds: str | None = None, equal_iterations: bool = True, **overrides) -> None:
    """Leave-one-volume-out: for each training volume of DATALIST, train each of --methods on the
    others (SAMora's stage 1 included, on the same volumes) and score the volume left out (Dice,
    HD95 in mm and in voxels, one overlay PNG per organ). Writes OUT/lovo.md, lovo.json, lovo_dice.png;
    rerunning the same command resumes (finished folds are kept); --folds a,b runs only the folds
    holding out those volumes (names without suffix) now; each fold's epochs are scaled to the optimiser
    steps of the recipe on the whole datalist (--equal_iterations False keeps the recipe's epochs). Extra
    --key value pairs override the training config (e.g. --epochs 4)."""
    table = crossval.leave_one_out(bundle, datalist, out, methods, profile, pretrain, folds, equal_iterations,
                                   **overrides)
    folds = list(json.loads((Path(out) / "lovo.json").read_text())["folds"])
    print(crossval.format_markdown(table, folds), end="")
    print(f"wrote {Path(out) / 'lovo.md'}, {Path(out) / 'lovo.json'}, {Path(out) / 'lovo_dice.png'}")


def _pretrain(bundle: str = "bundles/samora_ct", level: str = "all", quick: bool = False,
              teacher_checkpoint: str | None = None, simclr_checkpoint: str | None = None,
              mae_checkpoint: str | None = None, profile: str | None = None, **overrides) -> None:
    """Stage 1 of BUNDLE: --level image|patch|pixel|cpt_simclr|cpt_mae|cpt|all (all = CPT, then the
    three experts); experts go to <bundle>/models/experts/lora_<level>.safetensors. --profile la,la_cpu
    merges configs/la.yaml and configs/la_cpu.yaml (+ la_cpu_pretrain.yaml) over the stage-1 configs."""
    workflow.pretrain(bundle, level, quick, teacher_checkpoint, simclr_checkpoint, mae_checkpoint, profile, **overrides)


def _bench(backbone: str = "sam_vit_b", batch: int = 8, dtype: str = "auto", img_size: int | None = None,
           warmup: int = 2, repeats: int = 7, decoder: str = "samed", engine: str = "eager") -> None:
    """Time SAMed and SAMora (encoder + decoder) on one batch; print one JSON object. --decoder
    samed|hsam: the decoder of both models (hsam: H-SAM vs H-SAMora); --engine: what runs them
    (eager, compile, torchscript, onnxruntime, openvino)."""
    bench.main(backbone, batch, dtype, img_size, warmup, repeats, decoder=decoder, engine=engine)


def _bench_precision(bundle: str, datalist: str, section: str = "test", weights: str | None = None) -> None:
    """Segment a datalist section with BUNDLE in fp32 and in bf16; print the label agreement as JSON."""
    print(json.dumps(bench.precision_agreement(bundle, datalist, section, weights)))


def _bench_infer(bundle: str, input: str, weights: str | None = None, precision: str | None = None,
                 limit: int | None = None) -> None:
    """Segment INPUT (file or folder) with BUNDLE as infer does, then run the model alone on the same
    slices; print per-volume and total seconds, overhead (end to end / model) and user/system CPU as JSON."""
    print(json.dumps(bench.infer_overhead(bundle, input, weights, precision, limit)))


def _bench_engines(bundle: str, input: str, engines: str = "eager,torchscript,onnxruntime,openvino", weights: str | None = None,
                   precision: str = "fp32", limit: int | None = None) -> None:
    """Segment INPUT (file or folder) with each engine of BUNDLE's model; print seconds per volume and
    label agreement with eager as JSON (--engines also takes compile)."""
    print(json.dumps(bench.engine_comparison(bundle, input, engines, weights, precision, limit)))


def _export(weights: str, out: str | None = None, dtype: str = "fp16", format: str = "weights") -> None:
    """--format weights (default): store trained WEIGHTS (and their model card) with half-precision
    tensors, e.g. to ship them. --format onnx | torchscript: write the fp32 model beside WEIGHTS
    (model.onnx / model.ts, or OUT) for `infer --engine onnxruntime|openvino|torchscript`."""
    if format == "weights":
        print(f"wrote {cards.export_weights(weights, out, dtype)}")
    else:
        print(f"wrote {export.export_model(weights, format, out)}")


def _demo(out: str = "demo_out", quick: bool = True) -> None:
    """Phantom -> SAMed fine-tuning -> evaluation -> NIfTI inference, printing where results went."""
    demo.main(out=out, quick=quick)


COMMANDS = {
    "phantom": _phantom,
    "convert": _convert,
    "pretrain": _pretrain,
    "train": _train,
    "lovo": _lovo,
    "evaluate": _evaluate,
    "infer": _infer,
    "bench": _bench,
    "bench-precision": _bench_precision,
    "bench-infer": _bench_infer,
    "bench-engines": _bench_engines,
    "export": _export,
    "demo": _demo,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()  # large per-batch buffers are reused, not page-faulted in again (see utils)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    try:
        fire.Fire(COMMANDS[argv[0]], command=argv[1:], name=f"python -m samora_components {argv[0]}")
    except Exception as err:  # noqa: BLE001 - the cause chain decides
        cause = user_error(err)
        if cause is None or os.environ.get("SAMORA_DEBUG"):
            raise
        print(f"error: {first_line(cause)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
