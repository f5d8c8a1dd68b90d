"""Small Ignite handlers the bundle configs attach to MONAI engines."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import ValidationHandler

from samora_components.bundle.cards import model_card_path
from samora_components.metrics.plots import line_plot
from samora_components.networks.expert_attention import ExpertAttention, gates_at
from samora_components.networks.fusion import LoRAHubFusion, lorahub_search
from samora_components.utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["ProgressBar", "ModelSaver", "Validation", "ValidationHistory", "TrainingCheckpoint", "TrainableState",
           "LossHistory", "LoRAHubSearch"]


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
        network = getattr(self.network, "module", self.network)
        folder, name = os.path.split(os.path.abspath(self.path))
        DiskSaver(folder, atomic=True, require_empty=False)(network.state_dict(), name)
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

    Attach to the evaluator (MONAI evaluators run with the trainer's epoch number).
    """

    def __init__(self, path: str, name: str = "val_mean_dice") -> None:
        self.path = path
        self.name = name
        self.epochs: list[int] = []
        self.values: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.epochs.append(int(engine.state.epoch))
        self.values.append(float(engine.state.metrics.get(self.name, float("nan"))))
        write_json(self.path, {"epochs": self.epochs, self.name: self.values})
        line_plot(self.epochs, {self.name: self.values}, self.path.rsplit(".", 1)[0] + ".png", xlabel="epoch",
                  ylabel=self.name, title="validation (learning curve)")


class TrainingCheckpoint:
    """Everything needed to resume (network, optimizer, scheduler and the trainer's own counters),
    written to ``save_dir/filename`` after every epoch through a temporary file and a rename, so
    an interrupted run always leaves a complete checkpoint of its last finished epoch.

    With ``resume=True`` an existing checkpoint is loaded when the run starts and training goes on
    from the epoch after it. The trainer cannot be referenced from its own handler list in a
    config, so it joins the saved objects at ``attach`` time.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: objects with ``state_dict``/``load_state_dict`` besides the trainer.
        resume: continue from an existing checkpoint.
        filename: checkpoint name.
    """

    def __init__(self, save_dir: str, save_dict: dict, resume: bool = False, filename: str = "last.pt") -> None:
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.filename = filename

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.filename)

    def attach(self, engine: Engine) -> None:
        self._objects = {**self.save_dict, "trainer": engine}
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _load(self, engine: Engine) -> None:
        if not os.path.isfile(self.path):
            logger.info("no checkpoint at %s: starting from scratch", self.path)
            return
        Checkpoint.load_objects(to_load=self._objects, checkpoint=torch.load(self.path, map_location="cpu", weights_only=True))
        logger.info("resumed from %s after epoch %d", self.path, engine.state.epoch)

    def _save(self, engine: Engine) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        state = {name: obj.state_dict() for name, obj in self._objects.items()}
        DiskSaver(self.save_dir, atomic=True, require_empty=False)(state, self.filename)


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


class LossHistory:
    """Records the mean training loss of every epoch in ``path`` (JSON) and draws it next to it
    (``.png``), rewriting both after each epoch.

    The JSON holds ``{"epochs": [...], "loss": [...], "first_iterations": [...], "iterations": n}``;
    ``first_iterations`` keeps the losses of the first ten iterations (before any averaging).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.epoch_losses: list[float] = []
        self.first: list[float] = []
        self._running: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        loss = float(engine.state.output["loss"])
        self._running.append(loss)
        if len(self.first) < 10:
            self.first.append(loss)

    def _epoch(self, engine: Engine) -> None:
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
