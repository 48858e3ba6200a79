"""``discus train xray-real`` / ``discus evaluate xray``: the real-radiograph scoliosis classifier's commands.

Exposes :data:`app` with ``train`` and ``evaluate``; :mod:`training.cli` mounts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Normal vs scoliosis on real AP spine radiographs: train, cross-validate, evaluate.",
                  no_args_is_help=True)


@app.command("train")
def train(
    data_dir: Path = typer.Option(None, "--data", help="Folder with labels.csv and images/ "
                                  "(default: ../shared/data/xray-scoliosis)."),
    out: Path = typer.Option(None, help="Package directory (default: the shipped models/packages/xray)."),
    px: int = typer.Option(128, min=32, help="Square network input in pixels."),
    folds: int = typer.Option(5, min=2, help="Stratified folds grouped by patient."),
    epochs: int = typer.Option(80, min=1, help="Upper bound on epochs per fold (early stopping)."),
    patience: int = typer.Option(25, min=1, help="Early-stopping patience in epochs."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="Torch CPU threads."),
) -> None:
    """Cross-validate paper C's recipe, train on all images and write the package with its card."""
    from models.package import SHIPPED_DIR
    from training.xray import DEFAULT_DATA, XrayRecipe, train_xray

    recipe = XrayRecipe(px=px, folds=folds, epochs=epochs, patience=patience, seed=seed, threads=threads)
    cfg = train_xray(data_dir or DEFAULT_DATA, out or SHIPPED_DIR / "xray", recipe, log=typer.echo)
    typer.echo(json.dumps(cfg.metrics, indent=2))


@app.command("evaluate")
def evaluate(
    data_dir: Path = typer.Argument(..., help="Folder with labels.csv (file, label) and the images it names."),
    out: Path = typer.Option(..., "--out", help="Report folder: predictions.csv, metrics.json, plots."),
    package: Path = typer.Option(None, help="Model package (default: the installed xray package)."),
    device: str = typer.Option(None, help="cpu or cuda (default cpu)."),
) -> None:
    """Classify every image of DATA_DIR as normal or scoliosis and score it against labels.csv."""
    from training.xray import evaluate_xray

    m = evaluate_xray(data_dir, out, package=package, device=device)
    keys = ("n", "accuracy", "auc", "sensitivity", "specificity", "ece")
    typer.echo(json.dumps({k: m[k] for k in keys} | {"report": str(out / "metrics.json")}, indent=2))


def main(args: list[str] | None = None) -> None:
    """Entry point for ``python -m training.xray_cli``."""
    app(args=args)


if __name__ == "__main__":
    main()
