"""The training loop: Adam, class-weighted cross-entropy, ReduceLROnPlateau, early stopping,
deterministic seeds, resumable checkpoints, a progress bar and AMP on CUDA.

Strategies: ``scratch`` (random init), ``frozen`` (weights from our own
checkpoint, only the classification head trained) and ``finetune`` (weights
from our own checkpoint, everything trained). No hub weights exist here, so the
checkpoint is always one the project trained itself.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from models.registry import Classifier
from training.datasets import CropDataset
from training.errors import CheckpointError, TrainingError

STRATEGIES: tuple[str, ...] = ("scratch", "frozen", "finetune")


@dataclass
class TrainSettings:
    """How to train.

    Parameters
    ----------
    epochs, batch_size : int
        Upper bound on epochs; batch size.
    lr, weight_decay : float
        Adam learning rate and weight decay.
    patience : int
        Early stopping: epochs without validation-loss improvement before stopping.
    plateau_factor, plateau_patience, min_lr : float, int, float
        ReduceLROnPlateau (paper C: 0.5, 5, 1e-5).
    class_weighting : bool
        Weight the loss by inverse class frequency of the training set.
    strategy : str
        ``scratch``, ``frozen`` or ``finetune``.
    init : str, optional
        Our own checkpoint for ``frozen``/``finetune``: a package directory, a
        ``.safetensors`` file or a training checkpoint.
    augmentation : str
        Name of an augmentation set (:mod:`training.augment`).
    seed : int
        Seeds Python, numpy and torch, batch order and augmentation.
    device : str, optional
        ``cuda`` or ``cpu``; CUDA when available by default.
    amp : bool
        Mixed precision on CUDA (ignored on CPU).
    threads : int
        Torch CPU threads.
    progress : bool
        Show a progress bar.

    Raises
    ------
    ValueError
        Naming the field when a value is out of range.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 8
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_lr: float = 1e-5
    class_weighting: bool = True
    strategy: str = "scratch"
    init: str | None = None
    augmentation: str = "none"
    seed: int = 0
    device: str | None = None
    amp: bool = True
    threads: int = 1
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "plateau_patience", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr!r}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor: must be in (0, 1), got {self.plateau_factor!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy != "scratch" and not self.init:
            raise ValueError(f"init: strategy {self.strategy!r} needs a checkpoint of our own to start from")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history and the best weights."""

    history: dict[str, list[float]]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    stopped_early: bool


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_init_weights(model: Classifier, source: str | Path) -> list[str]:
    """Load our own weights into ``model``; tensors of another shape (a different head) are skipped.

    Returns the names of the skipped tensors.

    Raises
    ------
    CheckpointError
        If the source cannot be read or nothing in it fits the model.
    """
    path = Path(source)
    try:
        if path.is_dir():
            from models.package import verify_package

            cfg = verify_package(path)
            state = load_file(str(path / cfg.weights))
        elif path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            blob = torch.load(path, map_location="cpu", weights_only=False)
            state = blob.get("best_state") or blob["model"]
    except Exception as exc:  # any unreadable source is one error for the caller
        raise CheckpointError(f"init: cannot read weights from {path}: {exc}") from None
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise CheckpointError(f"init: no tensor of {path} fits the model")
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w / w[w > 0].mean()


@torch.no_grad()
def predict_probs(model: Classifier, data: CropDataset, batch_size: int = 64, device: torch.device | None = None) -> np.ndarray:
    """Softmax probabilities ``[N, C]`` for a dataset (no augmentation)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        x, _ = data.batch(torch.arange(i, min(i + batch_size, len(data))), train=False)
        with torch.autocast("cuda", enabled=device.type == "cuda"):
            out.append(torch.softmax(model(x.to(device)).float(), 1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _prepare(model: Classifier, settings: TrainSettings) -> list[torch.nn.Parameter]:
    if settings.strategy != "scratch":
        load_init_weights(model, settings.init)  # type: ignore[arg-type]
    if settings.strategy == "frozen":
        head = {id(p) for p in model.head_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("model: no trainable parameters")
    return params


def fit(
    model: Classifier,
    train: CropDataset,
    val: CropDataset | None,
    settings: TrainSettings,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` in place; returns the history and the weights of the best epoch.

    The best epoch is the one with the lowest validation loss (training loss
    without validation). A checkpoint written after every epoch lets an
    interrupted run resume where it stopped with the same result.

    Raises
    ------
    CheckpointError
        If ``resume`` is set and the checkpoint does not belong to this run.
    TrainingError
        If the training set is empty.
    """
    if len(train) == 0:
        raise TrainingError("train: empty training set")
    torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    params = _prepare(model, settings)
    model.to(device)
    from training.augment import augmentation

    train.augment = augmentation(settings.augmentation) if settings.augmentation != "none" else None
    opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=settings.plateau_factor, patience=settings.plateau_patience, min_lr=settings.min_lr)
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    k = int(train.labels.max()) + 1 if len(train.labels) else 1
    n_classes = max(k, len(train.crops.class_names))
    weights = class_weights(train.labels, n_classes).to(device) if settings.class_weighting else None
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_accuracy": [], "lr": []}
    best_loss, best_epoch, bad, start = float("inf"), 0, 0, 0
    best_state = copy.deepcopy(model.state_dict())
    ckpt = Path(checkpoint) if checkpoint else None
    if resume and ckpt and ckpt.is_file():
        blob = torch.load(ckpt, map_location=device, weights_only=False)
        if blob.get("settings", {}).get("seed") != settings.seed or blob.get("n_train") != len(train):
            raise CheckpointError(f"checkpoint: {ckpt} was written by another run (seed or data differ)")
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        history, best_loss, best_epoch, bad = blob["history"], blob["best_loss"], blob["best_epoch"], blob["bad"]
        best_state, start = blob["best_state"], blob["epoch"]
    stopped = False
    bar = tqdm(total=settings.epochs, initial=start, desc=desc, disable=not settings.progress, leave=False)
    for epoch in range(start, settings.epochs):
        if bad >= settings.patience:
            stopped = True
            break
        model.train()
        if settings.strategy == "frozen":
            # frozen layers keep their batch-norm statistics too
            for m in model.modules():
                if not any(p.requires_grad for p in m.parameters(recurse=False)) and len(list(m.children())) == 0:
                    m.eval()
        gen = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            if len(idx) < 2 and len(order) > 1:
                continue  # a batch of one breaks batch normalisation
            x, y = train.batch(idx, train=True, generator=gen)
            x, y = x.to(device), y.to(device)
            with torch.autocast("cuda", enabled=use_amp):
                loss = F.cross_entropy(model(x).float(), y, weight=weights)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(idx)
            count += len(idx)
        train_loss = total / max(count, 1)
        history["train_loss"].append(train_loss)
        history["lr"].append(opt.param_groups[0]["lr"])
        if val is not None and len(val):
            probs = predict_probs(model, val, device=device)
            yv = val.labels.numpy()
            p = np.clip(probs[np.arange(len(yv)), yv], 1e-7, 1.0)
            monitor = float(-np.log(p).mean())
            history["val_loss"].append(monitor)
            history["val_accuracy"].append(float((probs.argmax(1) == yv).mean()))
        else:
            monitor = train_loss
        sched.step(monitor)
        if monitor < best_loss - 1e-4:
            best_loss, best_epoch, bad = monitor, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{monitor:.3f}",
                        acc=f"{history['val_accuracy'][-1]:.3f}" if history["val_accuracy"] else "-")
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(), "history": history, "best_loss": best_loss,
                        "best_epoch": best_epoch, "bad": bad, "best_state": best_state, "epoch": epoch + 1,
                        "settings": settings.to_dict(), "n_train": len(train)}, ckpt)
    bar.close()
    if bad >= settings.patience:
        stopped = True
    model.load_state_dict(best_state)
    return FitResult(history, best_epoch, best_state, stopped)
