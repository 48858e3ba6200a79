"""``discus train segmentation`` / ``discus evaluate segmentation``: the spine segmenter's commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def train(
    data_root: Path = typer.Option(_DATA, help="Folder holding spider-space/ and lumbar-mri-levels/."),
    out: Path = typer.Option(Path("var/segmentation/cv"), help="Cross-validation folder (fold packages, predictions)."),
    folds: int = typer.Option(3, min=2, help="Case-grouped folds."),
    steps: int = typer.Option(2500, min=1, help="Optimiser steps of the shipped model."),
    cv_steps: int = typer.Option(1500, min=1, help="Optimiser steps of each fold's model."),
    skip_cv: bool = typer.Option(False, help="Reuse OUT/cv.json instead of cross-validating again."),
) -> None:
    """Cross-validate on both real mask sets, then train on all of them and write the package and its card."""
    from training.segmentation import main

    main([str(data_root), str(out), "--folds", str(folds), "--steps", str(steps), "--cv-steps", str(cv_steps),
          *(["--skip-cv"] if skip_cv else [])])


def evaluate(
    data_dir: Path = typer.Argument(..., help="Folder in the lumbar-mri-levels (levels.json) or spider-space (cases.json) format."),
    out: Path = typer.Option(..., "--out", help="Report folder: metrics.json, measurements.csv, cases/, bland_altman.png."),
    package: Path = typer.Option(None, help="Segmentation package (default: the shipped one)."),
    levels: str = typer.Option("localizer", help="Name levels by the product's 'localizer' or the 'reference' points."),
) -> None:
    """Segment, label and measure every case; Dice per structure and agreement of every measurement."""
    from training.segmentation_eval import evaluate_segmentation

    m = evaluate_segmentation(data_dir, out, package=package, levels=levels, log=typer.echo)
    typer.echo(json.dumps({k: v for k, v in m.items() if k != "cases"}, indent=2))
