"""Small Ignite handlers the bundle configs attach to MONAI engines."""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import ValidationHandler
from monai.transforms import Randomizable

from samora_components.bundle.cards import model_card_path
from samora_components.metrics.plots import line_plot
from samora_components.networks.expert_attention import ExpertAttention, gates_at
from samora_components.networks.fusion import LoRAHubFusion, lorahub_search
from samora_components.utils import atomic_path, remove_stale_partials, write_json

logger = logging.getLogger(__name__)

__all__ = ["ProgressBar", "ModelSaver", "Validation", "ValidationHistory", "TrainingCheckpoint", "TrainableState",
           "LossHistory", "LoRAHubSearch", "process_rank", "random_state", "set_random_state", "save_torch"]

#: test hook of :class:`TrainingCheckpoint`: ``SAMORA_HOLD_CHECKPOINT_WRITE=<epoch>`` stops the write of
#: that epoch's checkpoint halfway (its temporary file half written) for up to ``_HOLD_SECONDS``, so
#: that a test can kill the process in the middle of a write at a known moment
HOLD_ENV = "SAMORA_HOLD_CHECKPOINT_WRITE"
_HOLD_SECONDS = 300.0


def process_rank() -> int:
    """This process's rank in the ``torch.distributed`` process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _unwrap(obj):
    """The module inside a ``DistributedDataParallel`` wrapper (anything else unchanged), so that
    checkpoints of 1-process and multi-process runs are interchangeable."""
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


def save_torch(obj, path: str) -> None:
    """``torch.save`` through :func:`samora_components.utils.atomic_path` (a hidden temporary file
    beside ``path``, renamed over it when complete)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _random_streams(root) -> list[np.random.RandomState]:
    """The random generators of the MONAI random transforms reachable from ``root`` (a dataset), in
    a fixed order (attribute and list order), each once."""
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if depth > 12 or id(obj) in seen or isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, int, float, type)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and id(obj.R) not in seen:
            seen.add(id(obj.R))
            found.append(obj.R)
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    visit(root, 0)
    return found


def _numpy_state(state: tuple) -> dict:
    """``RandomState.get_state()`` as tensors and numbers (``torch.load(weights_only=True)`` reads them)."""
    name, keys, pos, has_gauss, gauss = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_tuple(state: dict) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


def random_state(data=None) -> dict:
    """Every random stream a training epoch draws from, as a checkpointable dict: torch (CPU and
    the current CUDA device), NumPy's and Python's global generators, and the generators of the
    MONAI random transforms inside ``data`` (the training dataset; the augmentation of
    ``num_workers=0`` loaders; worker processes are seeded from torch's stream)."""
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random.get_state()),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "transforms": [_numpy_state(r.get_state()) for r in _random_streams(data)] if data is not None else [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict, data=None) -> None:
    """Restore what :func:`random_state` recorded (the same ``data`` structure)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_tuple(state["numpy"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    streams = _random_streams(data) if data is not None else []
    if len(streams) != len(state["transforms"]):
        raise ValueError(f"the checkpoint has {len(state['transforms'])} random transform streams, "
                         f"the training data {len(streams)}: resume with the configuration that wrote it")
    for stream, saved in zip(streams, state["transforms"]):
        stream.set_state(_numpy_tuple(saved))


class ProgressBar:
    """Ignite's tqdm progress bar, configurable from a bundle (MONAI calls ``attach(engine)`` only).

    Args:
        output_transform: maps ``engine.state.output`` to a number or dict shown on the bar.
        desc: bar description.
    """

    def __init__(self, output_transform: Callable | None = None, desc: str = "", persist: bool = False) -> None:
        self.output_transform = output_transform
        self.bar = _IgniteProgressBar(persist=persist, desc=desc)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)


class ModelSaver:
    """Writes the trained weights (a plain state dict of what training changed, as MONAI Label loads
    it) and their model card (``model.pt`` -> ``model.json``), so the two always describe the same
    model. Both files are replaced atomically.

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is unwrapped).
        path: the weights file, e.g. ``models/model.pt``.
        card: configuration values describing the network (the bundle's ``model_card``).
        checkpoint: ``"last"`` (default, as SAMed/H-SAM report: the weights at the end of training)
            or ``"best"`` (whenever ``evaluator``'s key metric improves; needs validation data).
        evaluator: the validation evaluator, for ``"best"``.

    Attach to the trainer.
    """

    CHOICES = ("last", "best")

    def __init__(self, network: torch.nn.Module, path: str, card: dict, checkpoint: str = "last", evaluator=None) -> None:
        if checkpoint not in self.CHOICES:
            raise ValueError(f"checkpoint must be one of {', '.join(self.CHOICES)}, got {checkpoint!r}")
        self.network = network
        self.path = path
        self.card = dict(card)
        self.checkpoint = checkpoint
        self.evaluator = evaluator
        self._trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        if self.checkpoint == "last":
            engine.add_event_handler(Events.COMPLETED, self._save_last)
            return
        if self.evaluator is None or not len(self.evaluator.data_loader):
            raise ValueError("checkpoint: best needs validation data (a 'validation' section in the datalist); "
                             "use checkpoint: last (the published protocols report the last epoch)")
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._save_best)

    def _save_last(self, engine: Engine) -> None:
        self.save(epoch=int(engine.state.epoch))

    def _save_best(self, evaluator: Engine) -> None:
        state = evaluator.state
        if state.best_metric_epoch == state.epoch:
            self.save(epoch=int(state.epoch), best_metric=float(state.best_metric))

    def save(self, **extra) -> None:
        """Write weights, then the card (``checkpoint``, ``epochs_done`` and ``extra`` added)."""
        save_torch(_unwrap(self.network).state_dict(), self.path)
        card = dict(self.card, checkpoint=self.checkpoint, **extra)
        card["epochs_done"] = card.pop("epoch", None)
        card["saved"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json(model_card_path(self.path), card)
        logger.info("weights (%s epoch %s) written to %s", self.checkpoint, card["epochs_done"], self.path)


class Validation(ValidationHandler):
    """MONAI's ``ValidationHandler`` that stays inert when there is no validation data: the published
    protocols have no validation split (validation only draws learning curves)."""

    def attach(self, engine: Engine) -> None:
        if self.validator is not None and not len(self.validator.data_loader):
            logger.info("no validation data: training runs without validation")
            return
        super().attach(engine)


class ValidationHistory:
    """Records the validation key metric after every validation run in ``path`` (JSON
    ``{"epochs": [...], "<name>": [...]}``) and draws it beside it (``.png``): the learning curve.

    Attach to the evaluator (MONAI evaluators run with the trainer's epoch number). With ``resume``
    (a resumed training run) the entries of earlier epochs already in ``path`` are kept; entries of
    the epoch being recorded and later ones (written before an interruption, then repeated) are
    replaced.
    """

    def __init__(self, path: str, name: str = "val_mean_dice", resume: bool = False) -> None:
        self.path = path
        self.name = name
        self.epochs: list[int] = []
        self.values: list[float] = []
        self._earlier = _read_history(path, name) if resume else ([], [])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if self._earlier is not None:
            kept = [(e, v) for e, v in zip(*self._earlier) if e < epoch]
            self.epochs, self.values = [e for e, _ in kept], [v for _, v in kept]
            self._earlier = None
        self.epochs.append(epoch)
        self.values.append(float(engine.state.metrics.get(self.name, float("nan"))))
        write_json(self.path, {"epochs": self.epochs, self.name: self.values})
        line_plot(self.epochs, {self.name: self.values}, self.path.rsplit(".", 1)[0] + ".png", xlabel="epoch",
                  ylabel=self.name, title="validation (learning curve)")


class TrainingCheckpoint:
    """Everything needed to resume (network, optimizer, scheduler, the trainer's own counters and
    every random stream of every process), written to ``save_dir/filename`` after every epoch.

    A run killed at any moment (SIGKILL included) and started again with the same command
    (``resume="auto"``, the default) goes on from its last finished epoch, so at most one epoch is repeated, and, on
    the same hardware and number of processes, ends with the same weights as an uninterrupted run:

    - the file is written to a hidden temporary file and renamed over the previous one
      (:func:`save_torch`), so ``filename`` is always a complete checkpoint; temporary files that a
      killed writer left behind are removed when the next run starts;
    - the write is the last handler of the epoch (it is registered when the run starts, after every
      handler attached before), so the validation and loss histories of the epoch are on disk first;
    - the random states (torch, NumPy, Python, the training data's random transforms) are those at
      the end of the epoch, restored at resume, so the next epoch draws the same shuffle,
      augmentation and noise as it would have without the interruption. Under
      ``torch.distributed`` every process keeps its own streams: rank 0 gathers them and writes
      the one file; at a resume rank 0 reads it and sends it to every rank, which takes its own
      part (so the handler is attached on every rank, and no shared file system is needed).

    The trainer cannot be referenced from its own handler list in a config, so it joins the saved
    objects at ``attach`` time; a ``DistributedDataParallel`` network is saved unwrapped, so
    1-process and multi-process runs can resume each other's checkpoints (then without the random
    states: those belong to one number of processes).

    Args:
        save_dir: folder of the checkpoint.
        save_dict: objects with ``state_dict``/``load_state_dict`` besides the trainer.
        resume: ``"auto"`` (the bundles' default): continue from the checkpoint when it belongs to
            an unfinished run with these settings (the same epochs, iterations per epoch and the
            same shapes of every saved tensor), else start from scratch and say why; ``True``:
            continue from any checkpoint there (an error if it does not fit); ``False``: start
            from scratch (the checkpoint is replaced after the first epoch).
        filename: checkpoint name.

    ``SAMORA_HOLD_CHECKPOINT_WRITE=<epoch>`` (tests only) holds the write of that epoch's checkpoint
    with its temporary file half written, for a kill at a known moment.
    """

    def __init__(self, save_dir: str, save_dict: dict, resume: bool | str = "auto", filename: str = "last.pt") -> None:
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be true, false or auto, got {resume!r}")
        self.save_dir = save_dir
        self.save_dict = {name: _unwrap(obj) for name, obj in save_dict.items()}
        self.resume = resume
        self.filename = filename

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.filename)

    def attach(self, engine: Engine) -> None:
        self._objects = {**self.save_dict, "trainer": engine}
        if process_rank() == 0:  # the writer: temporary files of killed writes go
            for removed in remove_stale_partials(self.save_dir):
                logger.info("removed %s, left by an interrupted write", removed)
        engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        self._run = self._fingerprint(engine)
        if self.resume:
            self._load(engine)
        if not engine.has_event_handler(self._save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    @staticmethod
    def _data(engine: Engine):
        loader = getattr(engine.state, "dataloader", None) or getattr(engine, "data_loader", None)
        return getattr(loader, "dataset", None)

    def _fingerprint(self, engine: Engine) -> dict:
        """What makes a checkpoint this run's: epochs, iterations per epoch, saved tensors' shapes."""
        shapes = {f"{name}.{key}": list(value.shape)
                  for name, obj in self.save_dict.items() for key, value in obj.state_dict().items()
                  if isinstance(value, torch.Tensor)}  # network / objective tensors (optimizer state is nested)
        return {"max_epochs": int(engine.state.max_epochs or 0), "epoch_length": int(engine.state.epoch_length or 0),
                "shapes": shapes}

    def _usable(self, state: dict, engine: Engine) -> bool:
        """``resume: auto``: whether ``state`` is an unfinished checkpoint of this run (else say why not)."""
        if state.get("run") != self._run:
            logger.info("%s was written by a run with other settings (epochs, iterations per epoch or network): "
                        "starting from scratch (--resume True would load it anyway)", self.path)
            return False
        trainer = state.get("trainer", {})
        done = int(trainer.get("epoch") or int(trainer.get("iteration", 0)) // max(1, int(trainer.get("epoch_length") or 1)))
        if done >= int(engine.state.max_epochs or 0):
            logger.info("%s belongs to a run that finished all %d epochs: starting a new run "
                        "(--resume False always starts from scratch)", self.path, done)
            return False
        return True

    def _load(self, engine: Engine) -> None:
        state = None
        if process_rank() == 0 and os.path.isfile(self.path):
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if self.resume == "auto" and not self._usable(state, engine):
                state = None
        if dist.is_available() and dist.is_initialized():  # rank 0 reads, every rank gets it
            shared = [state]
            dist.broadcast_object_list(shared, src=0)
            state = shared[0]
        if state is None:
            if not os.path.isfile(self.path):
                logger.info("no checkpoint at %s: starting from scratch", self.path)
            return
        for name, obj in self._objects.items():
            obj.load_state_dict(state[name])
        randomness = state.get("random") or []
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if len(randomness) == world:
            set_random_state(randomness[process_rank()], self._data(engine))
        else:
            logger.warning("%s holds the random states of %d process(es), this run has %d: the run goes on "
                           "with fresh random streams", self.path, len(randomness), world)
        logger.info("resumed from %s after epoch %d", self.path, engine.state.epoch)

    def _save(self, engine: Engine) -> None:
        randomness = random_state(self._data(engine))
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, randomness)
        else:
            gathered = [randomness]
        if process_rank() != 0:
            return
        state = {name: obj.state_dict() for name, obj in self._objects.items()}
        state["random"] = gathered
        state["run"] = self._run
        hold = os.environ.get(HOLD_ENV)
        if hold is not None and int(hold) == engine.state.epoch:
            self._write_held(state)
        else:
            save_torch(state, self.path)

    def _write_held(self, state: dict) -> None:
        """The test hook: write the temporary file, cut it in half, wait, then finish normally."""
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            logger.warning("%s set: checkpoint write held half-way in %s", HOLD_ENV, tmp)
            deadline = time.monotonic() + _HOLD_SECONDS
            while time.monotonic() < deadline:
                time.sleep(0.05)
            torch.save(state, tmp)


class TrainableState:
    """``state_dict``/``load_state_dict`` view of a module restricted to what training changes:
    parameters with ``requires_grad`` and the buffers of modules that own such parameters.

    Resumable checkpoints of stage 1 then hold the expert and its head (or the teacher during CPT),
    not the frozen SAM encoder or a frozen teacher.
    """

    def __init__(self, module) -> None:
        self.module = module

    def _keys(self) -> set[str]:
        keys = set()
        for name, child in self.module.named_modules():
            own = list(child.named_parameters(recurse=False))
            if any(p.requires_grad for _, p in own):
                prefix = f"{name}." if name else ""
                keys |= {prefix + n for n, p in own if p.requires_grad}
                keys |= {prefix + n for n, _ in child.named_buffers(recurse=False)}
        return keys

    def state_dict(self) -> dict:
        keys = self._keys()
        return {k: v for k, v in self.module.state_dict().items() if k in keys}

    def load_state_dict(self, state: dict) -> None:
        missing = self._keys() - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable entries, e.g. {sorted(missing)[:3]}")
        self.module.load_state_dict(state, strict=False)


def _read_history(path: str, name: str) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of a history JSON file written before (empty when there is none)."""
    if not os.path.isfile(path):
        return [], []
    with open(path) as handle:
        content = json.load(handle)
    return [int(e) for e in content.get("epochs", [])], [float(v) for v in content.get(name, [])]


class LossHistory:
    """Records the mean training loss of every epoch in ``path`` (JSON) and draws it next to it
    (``.png``), rewriting both after each epoch.

    The JSON holds ``{"epochs": [...], "loss": [...], "first_iterations": [...], "iterations": n}``;
    ``first_iterations`` keeps the losses of the first ten iterations (before any averaging). With
    ``resume`` (a resumed run) the epochs before the first one this run completes are kept from
    ``path``, with their first iterations.
    """

    def __init__(self, path: str, resume: bool = False) -> None:
        self.path = path
        self.epoch_losses: list[float] = []
        self.first: list[float] = []
        self._running: list[float] = []
        self._earlier = _read_history(path, "loss") if resume else None
        self._earlier_first: list[float] = []
        if self._earlier is not None and os.path.isfile(path):
            with open(path) as handle:
                self._earlier_first = [float(v) for v in json.load(handle).get("first_iterations", [])]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        loss = float(engine.state.output["loss"])
        self._running.append(loss)
        if len(self.first) < 10:
            self.first.append(loss)

    def _epoch(self, engine: Engine) -> None:
        if self._earlier is not None:  # a resumed run: epochs 1 .. epoch-1 come from the file
            done = int(engine.state.epoch) - 1
            self.epoch_losses = [v for e, v in zip(*self._earlier) if e <= done][:done]
            earlier_first = self._earlier_first[:done * int(engine.state.epoch_length or 0)]
            self.first = (earlier_first + self.first)[:10]
            self._earlier = None
        if self._running:
            self.epoch_losses.append(sum(self._running) / len(self._running))
        self._running = []
        epochs = list(range(1, len(self.epoch_losses) + 1))
        write_json(self.path, {"epochs": epochs, "loss": self.epoch_losses, "first_iterations": self.first,
                               "iterations": int(engine.state.iteration)})
        line_plot(epochs, {"training loss": self.epoch_losses}, self.path.rsplit(".", 1)[0] + ".png",
                  xlabel="epoch", ylabel="loss", title="stage-1 training loss")


class LoRAHubSearch:
    """Runs LoRAHub's gradient-free expert-weight search (:func:`samora_components.networks.fusion.lorahub_search`)
    at the start of every ``interval``-th epoch, on the first ``batches`` batches of ``loader``, with
    the rest of the network fixed; in between, the decoder trains by gradient as usual.

    Inert for networks without LoRAHub fusion, so the bundle can list it unconditionally.

    Args:
        network: the :class:`SAMoraNet` being trained.
        loader: labeled batches (``image``, ``label``).
        loss_function: the training loss (e.g. ``DiceCELoss``).
        batches / iterations / interval: search data, objective evaluations per search, epochs between searches.
    """

    def __init__(self, network, loader, loss_function, batches: int = 4, iterations: int = 40, interval: int = 1,
                 device: str | torch.device = "cpu") -> None:
        # searched in this process alone: a DistributedDataParallel wrapper's forward would wait for
        # the other ranks (multi_gpu_train.yaml runs the search on rank 0; DDP then broadcasts the
        # weights, which are buffers, to every rank at the next training step)
        network = _unwrap(network)
        self.network = network
        self.fusions = [m for m in network.modules() if isinstance(m, LoRAHubFusion)]
        self.sites = [m for m in network.modules() if isinstance(m, ExpertAttention) and isinstance(m.fusion, LoRAHubFusion)]
        self.loader = loader
        self.loss_function = loss_function
        self.batches = batches
        self.iterations = iterations
        self.interval = max(1, int(interval))
        self.device = torch.device(device)

    def attach(self, engine: Engine) -> None:
        if self.fusions:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def _objective(self, data: list) -> float:
        total = 0.0
        for image, label in data:
            total += float(self.loss_function(self.network(image), label))
        return total / len(data)

    def __call__(self, engine: Engine) -> None:
        if (engine.state.epoch - 1) % self.interval:
            return
        data = []
        for index, batch in enumerate(self.loader):
            if index >= self.batches:
                break
            data.append((batch["image"].to(self.device), batch["label"].to(self.device)))
        was_training = self.network.training
        self.network.eval()
        # LoRAHub searches the composed LoRA at full strength: with the SAMora gate at its start value
        # 0 the experts would not move the loss at all and only the L1 term would act
        with gates_at(self.sites, 1.0):
            weights = lorahub_search(self.fusions, lambda: self._objective(data), self.iterations)
        self.network.train(was_training)
        logger.info("LoRAHub weights after epoch %d: %s", engine.state.epoch - 1, [round(float(w), 3) for w in weights])
