"""Serve the SAMora bundles with a MONAI Label server (see docs/monailabel.md).

``make label-server STUDIES=/path/to/niftis`` runs this module in the label environment
(``.venv-label``, built from ``requirements-label.txt``): MONAI Label 0.8.5 needs numpy < 2, the
main environment does not, so the server lives in its own virtualenv.

What it does, in order:

1. picks the bundles to serve (default: every ``bundles/*`` folder with ``configs/inference.yaml``);
   a bundle without ``models/model.pt`` is skipped with one line on stderr, and so is one whose
   model card (``models/model.json``) disagrees with the architecture its ``inference.yaml`` writes
   out, or whose weights do not load strictly (``torch.load(..., weights_only=True)``) into that network;
2. writes the app folder (default ``build/monailabel``, git-ignored): a copy of the ``monaibundle``
   sample app shipped inside the installed monailabel wheel, with ``model/<bundle name>`` linking
   to each bundle, so every model is found locally;
3. starts ``monailabel start_server`` in this process, bound to 127.0.0.1 unless told otherwise,
   with the app options that keep it off the network: ``zoo_source`` other than ``monaihosting``
   (no model-zoo listing; bundles come from ``model/``), ``sam2 false`` (no SAM2 models, whose
   weights would be downloaded on first use) and ``skip_trainers true``; uvicorn serves
   ``guarded_app``, monailabel's app with the checks of ``guard_app`` in front of ``/infer``
   (unknown model or study id: 404; a stored study that is not a readable NIfTI volume: 422).

Errors that stop the start (no studies folder, no bundle with weights, monailabel missing) are
one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from samora_components.bundle.cards import check_card, read_model_card
from samora_components.utils import first_line

__all__ = [
    "APP_CONF",
    "DEFAULT_APP_DIR",
    "DEFAULT_BUNDLES_DIR",
    "LabelServerError",
    "ServedBundle",
    "UVICORN_APP",
    "check_bundle",
    "find_bundles",
    "guard_app",
    "infer_problem",
    "main",
    "prepare_app",
    "sample_app_dir",
    "server_argv",
    "volume_problem",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLES_DIR = REPO_ROOT / "bundles"
DEFAULT_APP_DIR = REPO_ROOT / "build" / "monailabel"
SAMPLE_APP = "monaibundle"

# Options of the monaibundle sample app (``--conf key value``).
APP_CONF = {
    # Anything but "monaihosting": the app then takes each model from <app>/model/<name> and only
    # falls back to a download for names that are not there (ours always are). "local" is no
    # download source at all, so a missing folder fails instead of fetching.
    "zoo_source": "local",
    # The app adds SAM2 models when the sam2 package is importable (it is a monailabel
    # dependency); their checkpoints are fetched from the internet on first use.
    "sam2": "false",
    # Training runs through `python -m samora_components train`, not through the label server.
    "skip_trainers": "true",
    "preload": "false",
}


# The ASGI app uvicorn serves: monailabel's own app with the request checks of guard_app. It is
# built on first access (module __getattr__), after `monailabel start_server` has set its settings.
UVICORN_APP = "samora_components.apps.label_server:guarded_app"
_INFER_PATH = re.compile(r"^/infer/([^/]+)/?$")
_VOLUME_CHECKS: dict[tuple[str, int, int], str | None] = {}


class LabelServerError(Exception):
    """A reason not to start the server; the message is one line for the user."""


@dataclass
class ServedBundle:
    """A bundle folder that the server will offer as model ``name``."""

    path: Path
    name: str
    labels: dict[str, int] = field(default_factory=dict)


def _bundle_folders(paths: list[str] | None) -> list[Path]:
    if paths:
        folders = [Path(p).expanduser() for p in paths]
        for folder in folders:
            if not (folder / "configs" / "inference.yaml").is_file():
                raise LabelServerError(f"{folder}: not a SAMora bundle (no configs/inference.yaml)")
        return folders
    if not DEFAULT_BUNDLES_DIR.is_dir():
        raise LabelServerError(f"{DEFAULT_BUNDLES_DIR}: no bundles folder; pass --bundles")
    return sorted(p for p in DEFAULT_BUNDLES_DIR.iterdir() if (p / "configs" / "inference.yaml").is_file())


def find_bundles(paths: list[str] | None = None) -> tuple[list[ServedBundle], list[str]]:
    """Bundles that have ``models/model.pt``, and one message for each bundle left out."""
    served: list[ServedBundle] = []
    skipped: list[str] = []
    for folder in _bundle_folders(paths):
        if not (folder / "models" / "model.pt").is_file():
            skipped.append(f"skip: {folder}: no models/model.pt (train the bundle first)")
            continue
        served.append(ServedBundle(path=folder.resolve(), name=folder.resolve().name))
    names = [b.name for b in served]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise LabelServerError(f"two bundles share the model name {doubles[0]!r}; serve one of them")
    return served, skipped


def _labels(bundle: Path) -> dict[str, int]:
    """Foreground labels as MONAI Label reads them: ``channel_def`` of the first output."""
    with open(bundle / "configs" / "metadata.json") as handle:
        metadata = json.load(handle)
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not outputs:
        raise LabelServerError("metadata.json has no network_data_format outputs")
    channels = next(iter(outputs.values())).get("channel_def", {})
    labels = {str(v).lower(): int(k) for k, v in channels.items() if str(v).lower() != "background"}
    if not labels:
        raise LabelServerError("metadata.json output has no channel_def labels")
    return labels


def check_bundle(bundle: ServedBundle) -> None:
    """Build the network as the server will, and load the weights strictly.

    MONAI Label loads ``model.pt`` with ``strict=False``; weights made for another architecture
    would then be served half-loaded. This check refuses them before the server starts.
    """
    import torch
    from monai.bundle import ConfigParser

    bundle.labels = _labels(bundle.path)
    parser = ConfigParser()
    parser.read_config(str(bundle.path / "configs" / "inference.yaml"))
    parser.config.update({"bundle_root": str(bundle.path)})
    for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
        if key not in parser.config:
            raise LabelServerError(f"configs/inference.yaml has no '{key}'")
    network = parser.get_parsed_content("network_def", instantiate=True)
    card = read_model_card(bundle.path / "models" / "model.pt")
    try:
        check_card(network, card, bundle.path / "models" / "model.pt")
    except ValueError as err:
        raise LabelServerError(f"models/model.json does not fit configs/inference.yaml ({first_line(err)})") from err
    try:
        state = torch.load(bundle.path / "models" / "model.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files
        raise LabelServerError(f"models/model.pt does not load as a plain state dict ({first_line(err)})") from err
    if not isinstance(state, dict):
        raise LabelServerError("models/model.pt is not a state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise LabelServerError(
            f"models/model.pt does not fit the network of models/model.json ({first_line(err)})"
        ) from err


def sample_app_dir() -> Path:
    """The monaibundle sample app that the monailabel wheel installs under ``sys.prefix``."""
    try:
        import monailabel
    except ImportError as err:
        raise LabelServerError(
            "monailabel is not installed in this Python; run `make label-server` (it builds .venv-label)"
        ) from err
    package_parent = Path(monailabel.__file__).resolve().parents[1]
    candidates = [
        Path(sys.prefix) / "monailabel" / "sample-apps" / SAMPLE_APP,
        Path(sys.prefix) / "local" / "monailabel" / "sample-apps" / SAMPLE_APP,
        package_parent / "sample-apps" / SAMPLE_APP,
    ]
    for candidate in candidates:
        if (candidate / "main.py").is_file():
            return candidate
    raise LabelServerError(f"the {SAMPLE_APP} sample app of monailabel was not found under {sys.prefix}")


def prepare_app(app_dir: str | Path, bundles: list[ServedBundle], sample: str | Path | None = None) -> Path:
    """Write the app folder: the sample app's code plus ``model/<name>`` links to the bundles.

    The app code is refreshed on every start; ``logs/`` is kept. Links left from earlier starts
    are removed, so only the bundles served now are in ``model/``.
    """
    app = Path(app_dir).resolve()
    source = Path(sample) if sample else sample_app_dir()
    app.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("logs", "model", "__pycache__"))
    models = app / "model"
    models.mkdir(exist_ok=True)
    for entry in models.iterdir():
        if entry.is_symlink():
            entry.unlink()
        elif entry.name in {b.name for b in bundles}:
            raise LabelServerError(f"{entry} is a real folder, not a link left by this tool; move it away")
    for bundle in bundles:
        (models / bundle.name).symlink_to(bundle.path, target_is_directory=True)
    return app


def volume_problem(path: str) -> str | None:
    """Why the file at ``path`` is not a volume the models may read (None when it is one).

    The whole file is decoded, so a truncated ``.nii.gz`` is caught here; the answer is remembered
    per (path, size, modification time).
    """
    import nibabel as nib
    import numpy as np

    try:
        info = os.stat(path)
    except OSError as err:
        return f"cannot read the file ({first_line(err)})"
    key = (path, info.st_size, info.st_mtime_ns)
    if key not in _VOLUME_CHECKS:
        try:
            image = nib.load(path)
            if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
                raise ValueError(f"{type(image).__name__} is not NIfTI")
            shape = tuple(int(n) for n in image.shape)
            if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
                raise ValueError(f"shape {shape} is not a 3-D volume")
            data = np.asanyarray(image.dataobj)
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise ValueError("it holds NaN or infinite values")
            _VOLUME_CHECKS[key] = None
        except Exception as err:  # nibabel raises many kinds for damaged files
            _VOLUME_CHECKS[key] = first_line(err) or type(err).__name__
    return _VOLUME_CHECKS[key]


def infer_problem(models: set[str], studies: list[str], model: str, image: str) -> tuple[int, str] | None:
    """HTTP status and message refusing ``/infer/<model>?image=<image>``, or None to let it run.

    Only a study id of the datastore is accepted: no server-side path, no volume sent with the
    request itself (upload it to the datastore first, where it is checked like every study).
    """
    if model not in models:
        return 404, f"no model '{model}' on this server (models: {', '.join(sorted(models))})"
    if not image:
        return 400, (
            "name a study of the datastore: /infer/<model>?image=<study id> (upload volumes with PUT /datastore/image)"
        )
    if image not in studies:
        return 404, f"no study '{image}' in the datastore"
    return None


def guard_app(app):
    """Add the request checks to monailabel's FastAPI ``app`` (before it starts) and return it.

    Every ``POST /infer/<model>`` is checked before monailabel sees it: unknown model or study id
    is a 404, and a stored study that is not a readable NIfTI volume is a 422, so a bad upload never
    reaches a model. MONAI Label's own "not found" and invalid-input errors become 404 and 400
    instead of 500.
    """
    from fastapi.responses import JSONResponse
    from monailabel.interfaces.exception import (
        ImageNotFoundException,
        LabelNotFoundException,
        MONAILabelError,
        MONAILabelException,
    )
    from monailabel.interfaces.utils.app import app_instance

    async def check_infer(request, call_next):
        match = _INFER_PATH.match(request.url.path) if request.method == "POST" else None
        if match:
            instance = app_instance()
            datastore = instance.datastore()
            image = request.query_params.get("image", "")
            models = set(instance.info().get("models", {}))
            refusal = infer_problem(models, datastore.list_images(), match.group(1), image)
            if refusal is None:
                problem = volume_problem(datastore.get_image_uri(image))
                if problem:
                    refusal = 422, f"study '{image}' is not a readable NIfTI volume: {problem}"
            if refusal:
                return JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
        return await call_next(request)

    async def client_error(request, err):
        if isinstance(err, (ImageNotFoundException, LabelNotFoundException)):
            status = 404
        elif getattr(err, "error", None) == MONAILabelError.INVALID_INPUT:
            status = 400
        else:
            status = 500
        return JSONResponse({"detail": first_line(getattr(err, "msg", err))}, status_code=status)

    app.middleware("http")(check_infer)
    app.add_exception_handler(MONAILabelException, client_error)
    return app


def __getattr__(name: str):
    if name == "guarded_app":
        from monailabel.app import app

        globals()["guarded_app"] = guard_app(app)
        return globals()["guarded_app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def server_argv(app: Path, studies: Path, bundles: list[ServedBundle], host: str, port: int) -> list[str]:
    """``monailabel start_server`` arguments."""
    conf = dict(APP_CONF, models=",".join(b.name for b in bundles))
    argv = ["monailabel", "start_server", "--app", str(app), "--studies", str(studies)]
    argv += ["--host", host, "--port", str(port), "--uvicorn_app", UVICORN_APP]
    for key, value in conf.items():
        argv += ["--conf", key, value]
    return argv


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m samora_components.apps.label_server",
        description="Start a MONAI Label server on a folder of NIfTI studies with the SAMora bundles as models.",
    )
    parser.add_argument("--studies", required=True, help="folder of NIfTI volumes (*.nii.gz, *.nii)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--bundles", nargs="+", default=None, help="bundle folders to serve (default: bundles/*)")
    parser.add_argument("--app-dir", default=str(DEFAULT_APP_DIR), help=f"app folder (default {DEFAULT_APP_DIR})")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and prepare everything, print the server command, do not serve"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        studies = Path(args.studies).expanduser()
        if not studies.is_dir():
            raise LabelServerError(f"{studies}: no such folder (STUDIES must be a folder of NIfTI volumes)")
        if not 0 < args.port < 65536:
            raise LabelServerError(f"port {args.port} is out of range")
        sample = sample_app_dir()
        bundles, skipped = find_bundles(args.bundles)
        for line in skipped:
            print(line, file=sys.stderr)
        checked = []
        for bundle in bundles:
            try:
                check_bundle(bundle)
                checked.append(bundle)
            except LabelServerError as err:
                print(f"skip: {bundle.path}: {err}", file=sys.stderr)
        if not checked:
            raise LabelServerError(
                "no bundle with usable models/model.pt to serve; train one first (see docs/monailabel.md)"
            )
        app = prepare_app(args.app_dir, checked, sample)
    except LabelServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    volumes = [p for p in studies.iterdir() if p.name.endswith((".nii.gz", ".nii"))]
    if not volumes:
        print(f"warning: {studies} has no .nii/.nii.gz files yet; a client can upload images", file=sys.stderr)
    if not _is_loopback(args.host):
        print(
            f"warning: binding {args.host}: anyone who can reach this machine can read the studies and run the "
            "models (MONAI Label has no authentication by default)",
            file=sys.stderr,
        )
    for bundle in checked:
        print(f"serving {bundle.name} from {bundle.path} (labels: {', '.join(bundle.labels)})", file=sys.stderr)
    command = server_argv(app, studies.resolve(), checked, args.host, args.port)
    print(f"MONAI Label on http://{args.host}:{args.port}/ ; studies {studies.resolve()}", file=sys.stderr)
    if args.dry_run:
        print(" ".join(command))
        return 0
    from monailabel.main import Main

    sys.argv = command
    Main().run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
