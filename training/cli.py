"""``discus train <task>`` and ``discus evaluate <task>``: Typer apps the project's CLI mounts.

One command per task (``mr_disc``, ``mr_canal``, ``mr_foramen``, ``mr_subarticular``,
``ct_disc``, ``ct_level``, ``xray``), plus ``levels`` from the level localizer's
commands when that module is present. Data come from synthetic phantom studies
(default), the RSNA 2024 layout or a folder/CSV manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer

from training.synthetic import DEFAULT_CACHE
from training.tasks import TASKS

train_app = typer.Typer(help="Train a classifier (cross-validated) and export its model package.",
                        no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate an installed model package on labelled data.", no_args_is_help=True)

#: Architecture each task ships with by default (the paper the task follows).
DEFAULT_ARCH = {
    "mr_disc": "attention_cnn_lss", "mr_canal": "attention_cnn_lss", "mr_foramen": "attention_cnn_lss",
    "mr_subarticular": "attention_cnn_lss", "ct_disc": "vit_ldh", "ct_level": "vit_ldh", "xray": "resnet50",
}
#: Default learning rate per architecture (paper A: 3e-4 for the ViT; paper B: 1e-3).
DEFAULT_LR = {"vit_ldh": 3e-4}
#: First seed of the fresh synthetic studies used as held-out data.
HOLDOUT_SEED = 100_000


class Source(str, Enum):
    synthetic = "synthetic"
    rsna = "rsna"
    manifest = "manifest"


def _load(task: str, source: Source, data: Path | None, seeds: int, seed_start: int, cache: Path, workers: int,
          crop_px: int | None = None):
    from training.datasets import CropSet

    if source is Source.synthetic:
        from training.synthetic import cached_synthetic_crops

        px = {"crop_px": {task: crop_px}} if crop_px else {}
        return cached_synthetic_crops(cache, [task], range(seed_start, seed_start + seeds), workers=workers,
                                      **px)[task]
    if data is None:
        raise typer.BadParameter(f"--data is required with --source {source.value}")
    if data.suffix == ".npz":
        return CropSet.load(data)
    if source is Source.rsna:
        from training.sources import load_rsna

        return load_rsna(data, task, crop_px)
    from training.sources import load_manifest

    return load_manifest(data, task, crop_px)


def _train_command(task: str) -> Callable[..., None]:
    def command(
        source: Source = typer.Option(Source.synthetic, help="Where the labelled data come from."),
        data: Path = typer.Option(None, help="RSNA root, manifest CSV/folder, or a saved crop set (.npz)."),
        holdout: Path = typer.Option(None, help="Held-out data in the same source format (default for "
                                     "synthetic: fresh seeds)."),
        seeds: int = typer.Option(300, min=5, help="Synthetic: number of training studies."),
        holdout_seeds: int = typer.Option(100, min=0, help="Synthetic: number of fresh held-out studies."),
        out: Path = typer.Option(None, help="Package directory (default var/packages/<task>)."),
        arch: str = typer.Option(DEFAULT_ARCH[task], help="Registered architecture."),
        small: bool = typer.Option(False, help="Use the architecture's reduced configuration."),
        model_kwargs: str = typer.Option(None, help="Extra builder arguments as JSON, e.g. "
                                         "'{\"output_stride\": 8}' for a finer Grad-CAM grid of a timm CNN."),
        multilayer_cam: bool = typer.Option(None, "--multilayer-cam/--single-layer-cam",
                                            help="Grad-CAM over several layers (default: only for vit_ldh)."),
        crop_px: int = typer.Option(None, min=8, help="Crop side in pixels, also the network input (default "
                                    f"{TASKS[task].crop_px}; paper A and C used 224)."),
        folds: int = typer.Option(5, min=1, help="Stratified folds grouped by patient (1: one 80:20 split)."),
        epochs: int = typer.Option(30, min=1),
        batch_size: int = typer.Option(32, min=2),
        lr: float = typer.Option(None, help="Adam learning rate (default per architecture)."),
        patience: int = typer.Option(8, min=1, help="Early-stopping patience in epochs."),
        strategy: str = typer.Option("scratch", help="scratch, frozen or finetune."),
        init: Path = typer.Option(None, help="Our own package or checkpoint for frozen/finetune."),
        augmentation: str = typer.Option(TASKS[task].augmentation, help="none, paper_a, paper_b, paper_c."),
        class_weighting: bool = typer.Option(True),
        seed: int = typer.Option(0),
        device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
        threads: int = typer.Option(1, min=1, help="Torch CPU threads."),
        version: str = typer.Option("0.1.0"),
        fp16: bool = typer.Option(True, help="Store weights in half precision."),
        resume: bool = typer.Option(False, help="Continue interrupted folds from their checkpoints."),
        cache: Path = typer.Option(DEFAULT_CACHE, help="Cache of synthetic crop sets."),
        workers: int = typer.Option(1, min=1, help="Processes rendering synthetic studies."),
    ) -> None:
        from training.loop import TrainSettings
        from training.trainer import train_task

        try:
            extra = json.loads(model_kwargs) if model_kwargs else None
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--model-kwargs: not JSON: {exc}") from exc
        if extra is not None and not isinstance(extra, dict):
            raise typer.BadParameter(f"--model-kwargs: expected a JSON object, got {model_kwargs!r}")
        crops = _load(task, source, data, seeds, 0, cache, workers, crop_px)
        held = None
        if holdout is not None:
            held = _load(task, source, holdout, 0, 0, cache, workers, crop_px)
        elif source is Source.synthetic and holdout_seeds:
            held = _load(task, source, None, holdout_seeds, HOLDOUT_SEED, cache, workers, crop_px)
        settings = TrainSettings(
            epochs=epochs, batch_size=batch_size, lr=lr or DEFAULT_LR.get(arch, 1e-3), patience=patience,
            strategy=strategy, init=str(init) if init else None, augmentation=augmentation,
            class_weighting=class_weighting, seed=seed, device=device, threads=threads,
        )
        target = out or Path("var/packages") / task
        explain = None if multilayer_cam is None else {"multilayer": multilayer_cam}
        cfg, cv = train_task(task, crops, target, arch, settings, small=small, model_kwargs=extra,
                             explain=explain, folds=folds, holdout=held,
                             version=version, fp16=fp16, synthetic=source is Source.synthetic,
                             checkpoint_dir=target / "checkpoints", resume=resume)
        typer.echo(json.dumps({"package": str(target), "cv": cv.summary, "metrics": cfg.metrics}, indent=2))

    command.__doc__ = f"Train {task}: {TASKS[task].description}."
    return command


def _evaluate_command(task: str) -> Callable[..., None]:
    def command(
        package: Path = typer.Option(None, help="Package directory (default: the installed one for the task)."),
        source: Source = typer.Option(Source.synthetic, help="Where the labelled data come from."),
        data: Path = typer.Option(None, help="RSNA root, manifest CSV/folder, or a saved crop set (.npz)."),
        seeds: int = typer.Option(100, min=1, help="Synthetic: number of fresh studies."),
        seed_start: int = typer.Option(HOLDOUT_SEED, help="Synthetic: first seed."),
        out: Path = typer.Option(Path("var/evaluation") / task, help="Report folder."),
        device: str = typer.Option(None),
        cache: Path = typer.Option(DEFAULT_CACHE, help="Cache of synthetic crop sets."),
        workers: int = typer.Option(1, min=1),
    ) -> None:
        from models.package import find_package
        from training.trainer import evaluate_package

        crops = _load(task, source, data, seeds, seed_start, cache, workers)
        report = evaluate_package(package or find_package(task), crops, out, device=device)
        m = report["metrics"]
        keys = ("accuracy", "macro_f1", "macro_auc", "rsna_weighted_log_loss", "n")
        typer.echo(json.dumps({k: m.get(k) for k in keys} | {"report": str(out / "evaluation.json")}, indent=2))

    command.__doc__ = f"Evaluate the {task} package: {TASKS[task].description}."
    return command


for _task in TASKS:
    train_app.command(_task)(_train_command(_task))
    if _task != "xray":  # the X-ray package is scored on real radiographs (training.xray_cli)
        evaluate_app.command(_task)(_evaluate_command(_task))

from training import xray_cli as _xray_cli  # noqa: E402

train_app.command("xray-real", help="Train the X-ray package on real AP radiographs (see training.xray_cli).")(
    _xray_cli.train)
evaluate_app.command("xray", help="Evaluate the X-ray package on a folder of labelled radiographs.")(
    _xray_cli.evaluate)

try:  # the level localizer's commands, when that part of training is installed
    from training import levels_cli as _levels_cli
except ImportError:
    _levels_cli = None
if _levels_cli is not None:
    train_app.command("levels", help="Train the level localizer (see training.levels_cli).")(_levels_cli.train)
    evaluate_app.command("levels", help="Evaluate the level localizer.")(_levels_cli.evaluate)

from training import discs_cli as _discs_cli  # noqa: E402

train_app.command("discs", help="Train the disc grader on SPIDER-format data (see training.discs_cli).")(
    _discs_cli.train)
evaluate_app.command("discs", help="Localize and grade the discs of a SPIDER-format folder.")(_discs_cli.evaluate)

from training import segmentation_cli as _segmentation_cli  # noqa: E402

train_app.command("segmentation", help="Train the sagittal spine segmenter on real masks (see training.segmentation).")(
    _segmentation_cli.train)
evaluate_app.command("segmentation", help="Segment and measure a labelled folder; Dice and measurement agreement.")(
    _segmentation_cli.evaluate)


def main(args: list[str] | None = None) -> None:
    """``python -m training.cli train|evaluate ...`` without the project's CLI."""
    app = typer.Typer(no_args_is_help=True)
    app.add_typer(train_app, name="train")
    app.add_typer(evaluate_app, name="evaluate")
    app(args=args)


if __name__ == "__main__":
    main()
