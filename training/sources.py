"""Readers for real data: the RSNA 2024 lumbar spine layout and folder/CSV manifests of 2D images.

Both return a :class:`training.datasets.CropSet` of raw crops (scanner units),
cut or resized the way the pipeline feeds the same task at inference.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage

from models.crops import CROP_SPECS
from models.preprocess import resize_image as _resize_image
from training.datasets import CropSet
from training.errors import DataError
from training.tasks import task_spec

#: RSNA 2024 conditions per task, with the series description they are labelled on.
RSNA_CONDITIONS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "mr_canal": (("Spinal Canal Stenosis", None),),
    "mr_foramen": (("Left Neural Foraminal Narrowing", "L"), ("Right Neural Foraminal Narrowing", "R")),
    "mr_subarticular": (("Left Subarticular Stenosis", "L"), ("Right Subarticular Stenosis", "R")),
}
#: RSNA grade strings -> class index (normal/mild, moderate, severe).
RSNA_GRADES = {"normal/mild": 0, "moderate": 1, "severe": 2}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def resize_image(image: np.ndarray, px: int) -> np.ndarray:
    """Whole image to ``px x px`` (bilinear, pixel centres aligned), as the pipeline resizes radiographs.

    Not antialiased, as for every package whose preprocessing does not ask for it
    (:func:`models.preprocess.resize_image`).
    """
    return _resize_image(np.asarray(image, np.float32), (px, px), antialias=False)


def read_dicom_image(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """First frame of a DICOM image in modality units (rescale applied, MONOCHROME1 inverted), and its pixel spacing.

    Raises
    ------
    DataError
        If the file is not a readable DICOM image.
    """
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for unreadable files
        raise DataError(f"path: {path} is not a readable DICOM image ({exc})") from None
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]
    elif arr.ndim == 3:
        arr = arr.mean(axis=-1)
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None) or (1.0, 1.0)
    return arr, (float(spacing[0]), float(spacing[1]))


def read_image(path: str | Path) -> np.ndarray:
    """A 2D image as float32: DICOM in modality units, PNG/JPEG/TIFF as grey levels.

    Raises
    ------
    DataError
        If the file cannot be read.
    """
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im if im.mode in ("L", "I", "I;16", "F") else im.convert("L"))
        except OSError as exc:
            raise DataError(f"path: {p} is not a readable image ({exc})") from None
        return arr.astype(np.float32)
    return read_dicom_image(p)[0]


def crop_around(image: np.ndarray, row: float, col: float, size_px: tuple[float, float], out_px: int,
                mirror: bool = False) -> np.ndarray:
    """Square crop of ``size_px`` (rows, columns) source pixels centred on ``(row, col)``, resampled to ``out_px``."""
    half = (out_px - 1) / 2.0
    t = (np.arange(out_px) - half) / out_px
    rr, cc = np.meshgrid(row + t * size_px[0], col + t * size_px[1], indexing="ij")
    crop = ndimage.map_coordinates(np.asarray(image, np.float32), [rr, cc], order=1, cval=0.0)
    return crop[:, ::-1].copy() if mirror else crop.astype(np.float32)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"path: {path} is missing")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_rsna(root: str | Path, task: str, crop_px: int | None = None, max_studies: int | None = None,
              progress: Callable[[int], None] | None = None) -> CropSet:
    """Crops per labelled level from the RSNA 2024 Lumbar Spine Degenerative Classification layout.

    ``root`` holds ``train.csv``, ``train_series_descriptions.csv``,
    ``train_label_coordinates.csv`` and ``train_images/<study>/<series>/<instance>.dcm``.
    Each labelled coordinate gives one crop of the task's field of view (millimetres
    from :data:`models.crops.CROP_SPECS`, converted with the image's pixel spacing)
    centred on the coordinate, right sides mirrored where the task mirrors them.

    Raises
    ------
    DataError
        If the task has no RSNA labels, a file is missing, or no crop could be made.
    """
    if task not in RSNA_CONDITIONS:
        raise DataError(f"task: the RSNA 2024 data label {', '.join(RSNA_CONDITIONS)}, not {task!r}")
    base = Path(root)
    spec = task_spec(task)
    px = crop_px or spec.crop_px
    crop_spec = CROP_SPECS[task]
    labels = {r["study_id"]: r for r in _read_csv(base / "train.csv")}
    rows = _read_csv(base / "train_label_coordinates.csv")
    wanted = {cond.lower(): side for cond, side in RSNA_CONDITIONS[task]}
    images, ys, groups, meta = [], [], [], []
    studies: list[str] = []
    for r in rows:
        cond = r["condition"].strip().lower()
        if cond not in wanted:
            continue
        study = r["study_id"]
        if study not in studies:
            if max_studies is not None and len(studies) >= max_studies:
                continue
            studies.append(study)
        side = wanted[cond]
        level = r["level"].strip().lower().replace("/", "_")
        column = f"{cond.replace(' ', '_')}_{level}"
        grade = (labels.get(study) or {}).get(column, "").strip().lower()
        if grade not in RSNA_GRADES:
            continue  # unlabelled level
        dcm = base / "train_images" / study / r["series_id"] / f"{int(float(r['instance_number']))}.dcm"
        image, spacing = read_dicom_image(dcm)
        size = (crop_spec.size_mm / spacing[0], crop_spec.size_mm / spacing[1])
        images.append(crop_around(image, float(r["y"]), float(r["x"]), size, px,
                                  mirror=crop_spec.mirror_right and side == "R"))
        ys.append(RSNA_GRADES[grade])
        groups.append(study)
        meta.append({"study": study, "series": r["series_id"], "level": level.upper().replace("_", "-"),
                     "side": side})
        if progress:
            progress(len(ys))
    if not images:
        raise DataError(f"root: no labelled {task} crops found under {base}")
    return CropSet(np.stack(images), np.array(ys), np.array(groups), list(spec.class_names), meta,
                   source=f"RSNA 2024 lumbar spine layout at {base.name}, {len(studies)} studies")


def load_manifest(path: str | Path, task: str, crop_px: int | None = None) -> CropSet:
    """Whole 2D images (DICOM or PNG/JPEG) with labels, resized to the task's crop size.

    ``path`` is either a CSV with columns ``path``, ``label`` and optionally
    ``patient`` (paths relative to the CSV; labels class names or indices), or a
    folder with one sub-folder per class name. Without a patient column each
    image is its own group.

    Raises
    ------
    DataError
        If the manifest is malformed, a label is unknown or no image is found.
    """
    spec = task_spec(task)
    names = list(spec.class_names)
    px = crop_px or spec.crop_px
    p = Path(path)
    entries: list[tuple[Path, str, str]] = []
    if p.is_dir():
        for i, c in enumerate(names):
            for f in sorted((p / c).glob("*")) if (p / c).is_dir() else []:
                if f.suffix.lower() in IMAGE_SUFFIXES + (".dcm", ""):
                    entries.append((f, c, f.stem))
        unknown = [d.name for d in p.iterdir() if d.is_dir() and d.name not in names]
        if unknown:
            raise DataError(f"path: folders {unknown} are not classes of {task} ({', '.join(names)})")
    else:
        rows = _read_csv(p)
        if rows and not {"path", "label"} <= set(rows[0]):
            raise DataError(f"path: {p} needs columns path and label, has {list(rows[0])}")
        for n, r in enumerate(rows, start=2):
            lab = r["label"].strip()
            if lab.isdigit() and int(lab) < len(names):
                lab = names[int(lab)]
            if lab not in names:
                raise DataError(f"label: line {n} of {p}: {lab!r} is not one of {', '.join(names)}")
            f = (p.parent / r["path"]).resolve()
            entries.append((f, lab, (r.get("patient") or "").strip() or f.stem))
    if not entries:
        raise DataError(f"path: no labelled images found in {p}")
    images = [resize_image(read_image(f), px) for f, _, _ in entries]
    return CropSet(np.stack(images), np.array([names.index(c) for _, c, _ in entries]),
                   np.array([g for _, _, g in entries]), names,
                   [{"path": str(f)} for f, _, _ in entries], source=f"manifest {p.name}, {len(entries)} images")
