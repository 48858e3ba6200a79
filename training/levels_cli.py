"""``discus train levels`` / ``discus evaluate levels``: the level localizer's commands.

Exposes :data:`app`, a Typer app with ``train`` and ``evaluate``; the project's
command line mounts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Level localization on sagittal MRI: train, cross-validate, evaluate.",
                  no_args_is_help=True)

_DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lumbar-mri-levels"


@app.command("train")
def train(
    data_dir: Path = typer.Option(_DEFAULT_DATA, help="Folder with levels.json and NIfTI volumes."),
    package_dir: Path = typer.Option(None, help="Where the trained package goes (default: the shipped one)."),
    out: Path = typer.Option(Path("var/levels/cv"), help="Cross-validation report folder."),
    folds: int = typer.Option(5, min=1, help="Case-grouped folds; 1 trains the final model only."),
    steps: int = typer.Option(None, min=1, help="Optimiser steps of the shipped model (default 2000)."),
    cv_steps: int = typer.Option(None, min=1, help="Optimiser steps of each fold's model (default: --steps)."),
    seed: int = typer.Option(0),
    phantom_seeds: int = typer.Option(40, min=0, help="Synthetic phantom anatomies mixed into training."),
    members: int = typer.Option(None, min=1, help="Networks per package, their heatmaps combined (default 3)."),
) -> None:
    """Cross-validate on the data, then train on all of it and write the model package."""
    from training.levels import MEMBERS, TRAIN_STEPS, default_package, train_levels

    pkg = train_levels(data_dir, package_dir or default_package(), out_dir=out, folds=folds,
                       steps=steps or TRAIN_STEPS, cv_steps=cv_steps, seed=seed, log=typer.echo,
                       phantom_seeds=phantom_seeds, members=members or MEMBERS)
    typer.echo(f"package written to {pkg}")


@app.command("evaluate")
def evaluate(
    data_dir: Path = typer.Argument(..., help="Folder in the levels.json format."),
    out: Path = typer.Option(..., "--out", help="Report folder: metrics.json, plots, overlays."),
    package: Path = typer.Option(None, help="Model package (default: the shipped one)."),
    overlays: bool = typer.Option(True, help="Write an overlay PNG per case."),
) -> None:
    """Localize every case of DATA_DIR and score it against its labels."""
    from training.levels import evaluate_levels

    metrics = evaluate_levels(data_dir, out, package=package, overlays=overlays)
    keys = ("n_studies", "id_rate", "mean_error_mm", "p95_error_mm", "disc_id_rate", "studies_mislabelled")
    typer.echo(json.dumps({k: metrics[k] for k in keys}, indent=2))


def main(args: list[str] | None = None) -> None:
    """Entry point for ``python -m training.levels_cli``."""
    app(args=args)


if __name__ == "__main__":
    main()
