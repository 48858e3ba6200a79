"""Calibrate the shipped phantom-trained packages on fresh phantom studies.

These packages were trained before temperature scaling was part of export, and
their cross-validation predictions were not kept. Fresh synthetic studies
(seeds never used in training) stand in for out-of-fold predictions: a
temperature is fitted on one set of studies, and the expected calibration
error (ECE) is measured before and after on another. The temperature goes into
``config.json``'s ``calibration``, the figures into a card section.

``python -m training.calibrate`` reproduces it (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.calibration import calibration_summary, log_probs
from models.package import SHIPPED_DIR
from models.predictor import Predictor
from training.cards import replace_card_section

#: Card section written (and replaced on a rerun).
CARD_HEADING = "## Calibration"
#: Package folder -> the synthetic task whose crops and labels it was trained on.
PHANTOM_TASKS: dict[str, str] = {
    "mr_disc": "mr_disc", "mr_canal": "mr_canal", "mr_foramen": "mr_foramen",
    "mr_subarticular": "mr_subarticular", "ct_disc": "ct_disc", "ct_level": "ct_level",
    "xray_spondylolisthesis": "xray",
}


def _logits(predictor: Predictor, crops: np.ndarray) -> np.ndarray:
    predictor.temperature = 1.0  # the bare network's outputs
    return log_probs(predictor.predict(crops))


def calibrate_package(package: str | Path, fit: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      note: str) -> dict[str, Any]:
    """Fit a temperature on ``fit`` (crops, labels), measure on ``test``; write config and card."""
    root = Path(package)
    predictor = Predictor.from_package(root, device="cpu")
    cal: dict[str, Any] = calibration_summary(
        _logits(predictor, fit[0]), fit[1], test=(_logits(predictor, test[0]), test[1]),
        method="temperature scaling fitted on fresh synthetic phantom studies (never used in training)")
    cal["data"] = note
    cfg_path = root / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["calibration"] = cal
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    replace_card_section(root, CARD_HEADING, (
        f"Temperature scaling: T = {cal['temperature']:.3f}, fitted on {cal['n_fit']} crops of fresh synthetic "
        f"phantom studies; on {cal['n']} crops of other fresh studies the expected calibration error is "
        f"{cal['ece_before']:.3f} before and {cal['ece_after']:.3f} after (NLL {cal['nll_before']:.3f} -> "
        f"{cal['nll_after']:.3f}). {note}. Calibrated on phantoms, these probabilities say nothing about "
        "patients' images."
    ))
    return cal


def main(args: list[str] | None = None) -> None:
    from training.synthetic import synthetic_crops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", nargs="*", default=list(PHANTOM_TASKS))
    ap.add_argument("--fit-seeds", type=int, default=20, help="studies to fit on (seeds 6000...)")
    ap.add_argument("--test-seeds", type=int, default=20, help="studies to measure on (seeds 7000...)")
    ns = ap.parse_args(args)
    for name in ns.packages:
        task = PHANTOM_TASKS[name]
        cfg = json.loads((SHIPPED_DIR / name / "config.json").read_text())
        px = int(cfg["preprocessing"].get("crop_px", cfg["input_size"][0]))
        sets = [synthetic_crops([task], range(start, start + n), crop_px={task: px})[task]
                for start, n in ((6000, ns.fit_seeds), (7000, ns.test_seeds))]
        if sets[0].class_names != cfg["class_names"]:
            raise SystemExit(f"{name}: crop classes {sets[0].class_names} are not the package's {cfg['class_names']}")
        note = (f"Fit on seeds 6000-{6000 + ns.fit_seeds - 1}, measured on seeds 7000-{7000 + ns.test_seeds - 1} "
                f"(`python -m training.calibrate`)")
        cal = calibrate_package(SHIPPED_DIR / name, (sets[0].images, sets[0].labels),
                                (sets[1].images, sets[1].labels), note)
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in cal.items()
                                if k not in ("method", "data")}), flush=True)


if __name__ == "__main__":
    main()
