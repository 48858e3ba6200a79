"""``discus train discs`` / ``discus evaluate discs``: the disc grader's commands.

Exposes :func:`train` and :func:`evaluate`, which the project's command line mounts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = _ROOT / ".." / "shared" / "data" / "spider-sagittal"
_PACKAGES = _ROOT / "models" / "packages"


def train(
    data_dir: Path = typer.Option(_DEFAULT_DATA, help="Folder in the spider-sagittal format (images/, series.csv, "
                                  "gradings.csv)."),
    package_dir: Path = typer.Option(_PACKAGES / "mr_disc_grading", help="Where the package goes."),
    out: Path = typer.Option(Path("var/discs/cv"), help="Cross-validation report folder."),
    localizer: Path = typer.Option(_PACKAGES / "levels", help="Level localizer package that finds the discs."),
    folds: int = typer.Option(5, min=2, help="Patient-grouped folds."),
    epochs: int = typer.Option(40, min=1, help="Most epochs per fold."),
    patience: int = typer.Option(8, min=1, help="Early-stopping patience in epochs."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="Torch CPU threads."),
    version: str = typer.Option("1.0.0"),
) -> None:
    """Locate the discs, cross-validate, calibrate, train on all patients and write the package."""
    from training.discs import train_discs

    cfg = train_discs(data_dir, package_dir, out, localizer, folds=folds, epochs=epochs, patience=patience,
                      seed=seed, threads=threads, version=version, progress=True, log=typer.echo)
    typer.echo(json.dumps(cfg.provenance["validation"]["figures"], indent=2))


def evaluate(
    data_dir: Path = typer.Argument(..., help="Folder in the spider-sagittal format."),
    out: Path = typer.Option(..., "--out", help="Report folder: predictions.csv, metrics.json, plots."),
    package: Path = typer.Option(_PACKAGES / "mr_disc_grading", help="Disc grading package."),
    localizer: Path = typer.Option(_PACKAGES / "levels", help="Level localizer package."),
) -> None:
    """Localize and grade every image of DATA_DIR and score it against its gradings."""
    from training.discs import evaluate_discs

    result = evaluate_discs(data_dir, out, package, localizer)
    typer.echo(json.dumps({"located": result.get("locations", {}).get("all"), "bar": result.get("bar"),
                           "report": str(out / "metrics.json")}, indent=2))
