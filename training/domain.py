"""Build and measure a package's input-domain reference (:mod:`models.domain`).

The reference is fitted on the penultimate features of crops like the package's
training crops; its threshold is a high percentile of the distances of crops it
never trained on (held-out crops of the same kind). Then the share of crops the
check flags is measured on held-out crops (should be small) and on crops it
must refuse (other modalities, real images for a phantom-trained package,
noise; should be large). The reference and the figures go into the package:
``domain.safetensors``, ``config.json``'s ``domain_check`` and a section of the
model card.

``python -m training.domain`` builds it for the shipped phantom-trained packages.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.crops import CROP_SPECS, crop_at_disc
from models.domain import DEFAULT_PERCENTILE, DOMAIN_FILE, FeatureDomain
from models.package import SHIPPED_DIR, sha256_file
from models.predictor import Predictor
from training.calibrate import PHANTOM_TASKS
from training.cards import replace_card_section

#: Card section written (and replaced on a rerun) by :func:`attach_domain`.
CARD_HEADING = "## Input-domain check"
#: Targets of the issue that asked for the check.
TARGET_HELDOUT, TARGET_FOREIGN = 0.05, 0.95


def attach_domain(
    package: str | Path,
    reference: np.ndarray,
    heldout: np.ndarray,
    foreign: Mapping[str, np.ndarray],
    *,
    reference_note: str,
    percentile: float = DEFAULT_PERCENTILE,
) -> dict[str, Any]:
    """Fit, store and measure the input-domain reference of ``package``; returns ``domain_check``.

    Parameters
    ----------
    package : path
        The package folder (its ``config.json`` and card are updated in place).
    reference, heldout : np.ndarray
        Raw crops ``[N, H, W]``: like the training inputs, and never trained on.
    foreign : mapping
        Name -> raw crops the check must refuse.
    reference_note : str
        What the reference and held-out crops are (for the card).
    percentile : float
        Percentile of the held-out distances where the threshold is set.

    Raises
    ------
    ValueError
        If a set is empty.
    """
    root = Path(package)
    cfg_path = root / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("domain_check", None)  # fit on the bare network: no reference in the way
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    predictor = Predictor.from_package(root, device="cpu")
    n_half = len(heldout) // 2
    if len(reference) < 2 or n_half < 1:
        raise ValueError("reference and heldout: need at least 2 crops each")
    # half of the held-out crops set the threshold; the other half measure it
    dom = FeatureDomain.fit(predictor.features(reference), predictor.features(heldout[:n_half]), percentile)
    flagged = {"heldout": float(dom.outside(predictor.features(heldout[n_half:])).mean())}
    for name, crops in foreign.items():
        if len(crops):
            flagged[name] = float(dom.outside(predictor.features(crops)).mean())
    dom.save(root)
    check = {
        "file": DOMAIN_FILE,
        "sha256": sha256_file(root / DOMAIN_FILE),
        "threshold": dom.threshold,
        "percentile": percentile,
        "features": "input of the last linear layer + mean and SD of each Grad-CAM layer",
        "reference": reference_note,
        "counts": {"reference": int(len(reference)), "threshold_set": int(n_half),
                   "heldout": int(len(heldout) - n_half), **{k: int(len(v)) for k, v in foreign.items()}},
        "flagged": flagged,
    }
    cfg["domain_check"] = check
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _card_section(root, check)
    return check


def _card_section(root: Path, check: dict[str, Any]) -> None:
    rows = "\n".join(
        f"| {name} | {check['counts'].get(name, '')} | {share:.1%} | "
        f"{'< 5%' if name == 'heldout' else '> 95%'} | "
        f"{'met' if (share < TARGET_HELDOUT if name == 'heldout' else share > TARGET_FOREIGN) else 'NOT met'} |"
        for name, share in check["flagged"].items()
    )
    replace_card_section(root, CARD_HEADING, (
        "A crop whose features (the last linear layer's input, mean and SD of each Grad-CAM layer) lie "
        "farther (Mahalanobis distance, Ledoit-Wolf "
        f"covariance) than {check['threshold']:.1f} from the reference gets no finding, only a warning. "
        f"Reference: {check['reference']}; threshold at the {check['percentile']:g}th percentile of "
        f"{check['counts']['threshold_set']} held-out crops, measured on {check['counts']['heldout']} others.\n\n"
        "| inputs | crops | flagged | target | |\n|---|---|---|---|---|\n" + rows
    ))


# --------------------------------------------------------------------------- crops of each kind


def noise_crops(n: int, px: int, seed: int = 0) -> np.ndarray:
    """Crops of Gaussian noise and of smooth random blobs (inputs no scanner makes)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    white = rng.normal(500, 200, (n - n // 2, px, px))
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, (n // 2, px, px)), (0, 4, 4)) * 2000
    return np.concatenate([white, smooth]).astype(np.float32)


def real_mri_crops(data_dir: str | Path, task: str, px: int, max_cases: int = 30) -> np.ndarray:
    """The task's crops at the labelled discs of real sagittal MRI volumes (``lumbar-mri-levels``)."""
    from training.levels import load_cases, to_dicom_geometry

    spec = CROP_SPECS[task]
    out = []
    for case in load_cases(data_dir)[:max_cases]:
        array, affine = to_dicom_geometry(case.image, case.affine)
        for disc in case.discs.values():
            vox_ijk = np.asarray(disc, float)
            point = affine[:3, :3] @ np.array([vox_ijk[1], vox_ijk[0], vox_ijk[2]]) + affine[:3, 3]
            sides = ("L", "R") if spec.mirror_right else (None,)
            for side in sides:
                crop = crop_at_disc(array.astype(np.float32), affine, point, spec, px, side)[0]
                if crop.std() > 0:
                    out.append(crop)
    return np.stack(out) if out else np.zeros((0, px, px), np.float32)


def real_sagittal_image_crops(data_dir: str | Path, px: int, size_frac: float = 0.3,
                              max_images: int = 60) -> np.ndarray:
    """Square crops around the centre of real mid-sagittal images (``spider-sagittal``)."""
    from PIL import Image

    out = []
    for path in sorted(Path(data_dir, "images").glob("*.png"))[:max_images]:
        img = np.asarray(Image.open(path).convert("L"), np.float32)
        h, w = img.shape
        s = int(min(h, w) * size_frac)
        for dr, dc in ((0, 0), (s // 2, 0), (-s // 2, 0)):
            r0, c0 = h // 2 + dr - s // 2, w // 2 + dc - s // 2
            patch = img[max(r0, 0):r0 + s, max(c0, 0):c0 + s]
            if patch.shape == (s, s):
                out.append(np.asarray(Image.fromarray(patch).resize((px, px), Image.BILINEAR), np.float32))
    return np.stack(out) if out else np.zeros((0, px, px), np.float32)


def _phantom_crops(tasks: list[str], seeds: range, px: int) -> dict[str, np.ndarray]:
    from training.synthetic import synthetic_crops

    sets = synthetic_crops(tasks, seeds, crop_px={t: px for t in tasks})
    return {t: s.images for t, s in sets.items()}


def build_shipped(shared: Path, tasks: list[str], seeds_ref: range, seeds_held: range) -> dict[str, Any]:
    """Domain references for the shipped phantom-trained packages; returns their ``domain_check``."""
    results = {}
    for task in tasks:
        root = SHIPPED_DIR / task
        cfg = json.loads((root / "config.json").read_text())
        px = int(cfg["preprocessing"].get("crop_px", cfg["input_size"][0]))
        synth = PHANTOM_TASKS.get(task, task)  # the synthetic task whose crops the package learned from
        own = _phantom_crops([synth], seeds_ref, px)[synth]
        held = _phantom_crops([synth], seeds_held, px)[synth]
        foreign: dict[str, np.ndarray] = {"noise": noise_crops(64, px)}
        if task.startswith("mr_"):
            foreign["CT phantom crops"] = _phantom_crops(["ct_disc"], range(seeds_held.start, seeds_held.start + 6),
                                                         px)["ct_disc"]
            if (shared / "lumbar-mri-levels" / "levels.json").is_file():
                foreign["real MRI (lumbar-mri-levels)"] = real_mri_crops(shared / "lumbar-mri-levels", task, px)
            if (shared / "spider-sagittal" / "images").is_dir():
                foreign["real MRI (spider-sagittal)"] = real_sagittal_image_crops(shared / "spider-sagittal", px)
        else:
            mr = _phantom_crops(["mr_canal"], range(seeds_held.start, seeds_held.start + 6), px)["mr_canal"]
            foreign["MR phantom crops"] = mr
            if (shared / "lumbar-mri-levels" / "levels.json").is_file():
                foreign["real MRI (lumbar-mri-levels)"] = real_mri_crops(shared / "lumbar-mri-levels", "mr_canal", px)
        if (shared / "xray-scoliosis" / "images").is_dir():
            from PIL import Image

            xs = sorted(Path(shared, "xray-scoliosis", "images").rglob("*.jpg"))[:40]
            foreign["real radiographs"] = np.stack(
                [np.asarray(Image.open(x).convert("L").resize((px, px)), np.float32) for x in xs])
        note = (f"crops of synthetic phantom studies (seeds {seeds_ref.start}-{seeds_ref.stop - 1}; held-out "
                f"seeds {seeds_held.start}-{seeds_held.stop - 1}), cut by the pipeline's crop path")
        results[task] = attach_domain(root, own, held, foreign, reference_note=note)
        print(task, json.dumps(results[task]["flagged"]), flush=True)
    return results


def main(args: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    ap.add_argument("--tasks", nargs="*", default=["mr_disc", "mr_canal", "mr_foramen", "mr_subarticular",
                                                   "ct_disc", "ct_level"])
    ap.add_argument("--seeds", type=int, default=40, help="phantom studies for the reference")
    ap.add_argument("--heldout-seeds", type=int, default=20, help="fresh phantom studies (seeds 5000...)")
    ns = ap.parse_args(args)
    build_shipped(ns.shared, list(ns.tasks), range(0, ns.seeds), range(5000, 5000 + ns.heldout_seeds))


if __name__ == "__main__":
    main()
