"""Training crops from synthetic phantom studies, cut exactly as the pipeline cuts them.

For each seed an anatomy is drawn with balanced findings (every grade of every
condition equally likely and independent at each lumbar disc; X-ray labels
uniform), rendered like ``discus demo-study`` renders it (sagittal T2 and T1 and
axial T2 MR, axial CT, AP and lateral radiographs), and cropped with
:func:`models.crops.crop_at_disc` around the true disc points, moved (as the
pipeline does) onto the nearest image and jittered by a few millimetres to
imitate localizer error. Labels come from the phantom's ground truth.

X-ray labels are per image: scoliosis shows on the AP view only and
spondylolisthesis on the lateral view only, so an image is labelled with the
finding visible on its view and "normal" otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dicom_io import phantom
from models.crops import CROP_SPECS, CropSpec, crop_at_disc
from training.datasets import CropSet
from training.errors import DataError
from training.tasks import task_spec

#: Tasks cut from each rendered modality.
MODALITY_TASKS: dict[str, tuple[str, ...]] = {
    "MR": ("mr_disc", "mr_canal", "mr_foramen", "mr_subarticular"),
    "CT": ("ct_disc", "ct_level"),
    "DX": ("xray",),
}
#: Default cache of rendered crop sets (outside the runtime folder, which demos reset).
DEFAULT_CACHE = Path(os.environ.get("DISCUS_CACHE", Path.home() / ".cache" / "discus")) / "synthetic"
#: Crop spec of the CT level task (paper A: the axial image at the disc, same field as ct_disc).


def balanced_findings(rng: np.random.Generator) -> dict[str, phantom.LevelFindings]:
    """Findings with every grade of every condition equally likely at each lumbar disc."""
    out = {}
    for disc in phantom.LUMBAR_DISCS:
        g = phantom.STENOSIS_GRADES
        out[disc] = phantom.LevelFindings(
            disc=str(rng.choice(phantom.DISC_GRADES)), disc_side=str(rng.choice(phantom.SIDES)),
            canal=str(rng.choice(g)), foramen_left=str(rng.choice(g)), foramen_right=str(rng.choice(g)),
            subarticular_left=str(rng.choice(g)), subarticular_right=str(rng.choice(g)),
        )
    return out


def _cut(series: phantom.RenderedSeries, disc: np.ndarray, spec: CropSpec, px: int, side: str | None,
         jitter: np.ndarray) -> np.ndarray:
    # the pipeline's own crop path (models.crops.crop_at_disc) at a jittered disc point
    return crop_at_disc(series.array, series.affine, disc + jitter, spec, px, side)[0]


def _xray_resize(image: np.ndarray, px: int) -> np.ndarray:
    # the pipeline resizes the whole radiograph this way for a package trained without antialiasing
    from models.preprocess import resize_image

    return resize_image(image, (px, px), antialias=False)


def seed_crops(seed: int, modality: str, crop_px: dict[str, int], jitter_mm: float = 2.0) -> dict[str, list]:
    """Crops of one synthetic study: ``{task: [(image, label, meta), ...]}``.

    Raises
    ------
    DataError
        If ``modality`` is not MR, CT or DX.
    """
    if modality not in MODALITY_TASKS:
        raise DataError(f"modality: must be one of {', '.join(MODALITY_TASKS)}, got {modality!r}")
    rng = np.random.default_rng([int(seed), 0xC1A55])
    out: dict[str, list] = {t: [] for t in MODALITY_TASKS[modality] if t in crop_px}
    if modality == "DX":
        label = str(rng.choice(phantom.XRAY_LABELS))
        anat = phantom.make_anatomy(int(seed), phantom.random_findings(rng), xray=phantom.XrayFindings(label))
        names = list(task_spec("xray").class_names)
        for view, visible in (("AP", "scoliosis"), ("LAT", "spondylolisthesis")):
            img = phantom.render_dx(anat, view).array[0]
            shown = label if label in (visible, "normal") else "normal"
            out["xray"].append((_xray_resize(img, crop_px["xray"]), names.index(shown),
                                {"seed": int(seed), "view": view, "study_label": label}))
        return out
    findings = balanced_findings(rng)
    anat = phantom.make_anatomy(int(seed), findings)
    levels = anat.levels_mm()

    def jit() -> np.ndarray:
        return rng.normal(0.0, jitter_mm / np.sqrt(3), 3)

    if modality == "CT":
        ct = phantom.render_ct(anat)
        for disc in phantom.LUMBAR_DISCS:
            p = np.asarray(levels[disc], float)
            f = findings[disc]
            if "ct_disc" in out:
                out["ct_disc"].append((_cut(ct, p, CROP_SPECS["ct_disc"], crop_px["ct_disc"], None, jit()),
                                       phantom.DISC_GRADES.index(f.disc), {"seed": int(seed), "level": disc}))
            names = task_spec("ct_level").class_names
            if "ct_level" in out and disc in names:
                out["ct_level"].append((_cut(ct, p, CROP_SPECS["ct_level"], crop_px["ct_level"], None, jit()),
                                        names.index(disc), {"seed": int(seed), "level": disc}))
        return out
    series = {}
    if "mr_canal" in out:
        series["mr_canal"] = phantom.render_mr(anat, "T2", "sagittal")
    if "mr_foramen" in out:
        series["mr_foramen"] = phantom.render_mr(anat, "T1", "sagittal")
    if "mr_disc" in out or "mr_subarticular" in out:
        series["mr_disc"] = series["mr_subarticular"] = phantom.render_mr(anat, "T2", "axial")
    grades = phantom.STENOSIS_GRADES
    for disc in phantom.LUMBAR_DISCS:
        p = np.asarray(levels[disc], float)
        f = findings[disc]
        for task in out:
            spec = CROP_SPECS[task]
            sides: tuple[str | None, ...] = ("L", "R") if spec.mirror_right else (None,)
            for side in sides:
                if task == "mr_disc":
                    label = phantom.DISC_GRADES.index(f.disc)
                elif task == "mr_canal":
                    label = grades.index(f.canal)
                else:
                    field_name = f"{'foramen' if task == 'mr_foramen' else 'subarticular'}_" + (
                        "left" if side == "L" else "right")
                    label = grades.index(getattr(f, field_name))
                crop = _cut(series[task], p, spec, crop_px[task], side, jit())
                out[task].append((crop, label, {"seed": int(seed), "level": disc, "side": side}))
    return out


def _worker(args: tuple[int, str, dict[str, int], float]) -> dict[str, list]:
    return seed_crops(*args)


def synthetic_crops(
    tasks: Iterable[str],
    seeds: Iterable[int],
    crop_px: dict[str, int] | None = None,
    jitter_mm: float = 2.0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, CropSet]:
    """Crop sets for ``tasks`` from the synthetic studies of ``seeds``.

    Parameters
    ----------
    tasks : iterable of str
        Task names (see :data:`training.tasks.TASKS`).
    seeds : iterable of int
        One study per seed and modality; the seed is the crop's group.
    crop_px : dict, optional
        Crop side per task (default: the task's ``crop_px``).
    jitter_mm : float
        Random displacement of the disc point (imitates localizer error).
    workers : int
        Processes rendering in parallel.
    progress : callable, optional
        Called with the number of studies done after each one.

    Raises
    ------
    DataError
        If a task is unknown or no seed is given.
    """
    tasks = list(tasks)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise DataError("seeds: need at least one")
    px = {t: (crop_px or {}).get(t, task_spec(t).crop_px) for t in tasks}
    jobs = [(s, m, {t: px[t] for t in ts if t in px}, jitter_mm)
            for m, ts in MODALITY_TASKS.items() if any(t in px for t in ts) for s in seeds]
    rows: dict[str, list] = {t: [] for t in tasks}
    done = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results: Iterable[dict[str, list]] = pool.map(_worker, jobs, chunksize=4)
            for res in results:
                for t, r in res.items():
                    rows[t].extend(r)
                done += 1
                if progress:
                    progress(done)
    else:
        for job in jobs:
            for t, r in _worker(job).items():
                rows[t].extend(r)
            done += 1
            if progress:
                progress(done)
    out = {}
    for t in tasks:
        spec = task_spec(t)
        r = rows[t]
        out[t] = CropSet(np.stack([a for a, _, _ in r]), np.array([b for _, b, _ in r]),
                         np.array([f"seed{m['seed']}" for _, _, m in r]), list(spec.class_names),
                         [m for _, _, m in r], source=f"synthetic phantom studies (phantom version "
                         f"{phantom.PHANTOM_VERSION}), seeds {seeds[0]}..{seeds[-1]}")
    return out


def cached_synthetic_crops(cache_dir: str | Path, tasks: Iterable[str], seeds: Iterable[int], **kwargs: Any) -> dict[str, CropSet]:
    """:func:`synthetic_crops`, cached as ``.npz`` per task under ``cache_dir``.

    The cache key holds the task, seeds, options and the phantom's version, so a
    changed phantom never serves crops rendered by an older one.
    """
    tasks, seeds = list(tasks), [int(s) for s in seeds]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in kwargs.items() if k not in ("workers", "progress")}

    def key(t: str) -> Path:
        h = hashlib.sha256(json.dumps([t, seeds, params, task_spec(t).crop_px, phantom.PHANTOM_VERSION],
                                      sort_keys=True).encode())
        return cache / f"{t}-{h.hexdigest()[:16]}.npz"

    missing = [t for t in tasks if not key(t).is_file()]
    made = synthetic_crops(missing, seeds, **kwargs) if missing else {}
    for t, s in made.items():
        s.save(key(t))
    return {t: made[t] if t in made else CropSet.load(key(t)) for t in tasks}
