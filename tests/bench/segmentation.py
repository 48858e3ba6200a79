"""Spine segmentation benchmark: seconds the segmenter and the measurements add to one MR study on this CPU.

Run with ``.venv/bin/python -m tests.bench.segmentation``. On a real sagittal volume of
``../shared/data/lumbar-mri-levels`` resliced to 4 mm slabs like a clinical series (or a synthetic
phantom series when that is absent), the level localizer finds the levels once; then the shipped
``spine_segmentation`` package segments the midline image and its two neighbours, names the
structures and measures the midline image, each stage timed over repeated runs after a warm-up.
Target: under 1 s per series.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from models.localizer import LevelLocalizer, reslab
from models.segmentation import SpineSegmenter, measure_image, midline_slice, source_labels

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data" / "lumbar-mri-levels"
PACKAGES = ROOT / "models" / "packages"


def _volume() -> tuple[np.ndarray, np.ndarray, str]:
    nifti = DATA / "VB2-04.nii.gz"
    if nifti.exists():
        from dicom_io.writer import nifti_to_lps

        array, affine = nifti_to_lps(nifti)
        array, affine, _ = reslab(np.asarray(array, np.float32), affine, 4.0)
        return array, affine, f"real volume {nifti.name} in 4 mm slabs, shape {array.shape}"
    from dicom_io import phantom

    s = phantom.render_mr(phantom.make_anatomy(3), "T2", "sagittal")
    return np.asarray(s.array, np.float32), np.asarray(s.affine), f"synthetic phantom, shape {s.array.shape}"


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    ns = p.parse_args(args)
    torch.set_num_threads(ns.threads)
    if not (PACKAGES / "spine_segmentation" / "config.json").is_file():
        print("segmentation: no shipped spine_segmentation package; nothing to time")
        return
    array, affine, what = _volume()
    located = LevelLocalizer.from_package(PACKAGES / "levels")(array, affine)
    if not located.points:
        print(f"segmentation: {what}: the localizer named no level; nothing to time")
        return
    vox = {pt.name: pt.voxel for pt in located.points}
    seg = SpineSegmenter.from_package(PACKAGES / "spine_segmentation")
    mid = midline_slice(array.shape, affine, [pt.point_mm for pt in located.points])
    slices = [s for s in (mid - 1, mid, mid + 1) if 0 <= s < array.shape[0]]
    shape = array.shape[1:]
    times: dict[str, list[float]] = {"segment": [], "label": [], "measure": []}
    for i in range(ns.repeats + 1):
        t0 = time.perf_counter()
        out = seg.segment(array, affine, slices)
        t1 = time.perf_counter()
        masks = [source_labels(out, j, shape, affine, vox) for j in range(len(slices))]
        t2 = time.perf_counter()
        measured = measure_image(masks[slices.index(mid)], affine)
        t3 = time.perf_counter()
        if i:  # the first run is the warm-up
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(v)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"segmentation: {what}; {len(slices)} images on a {out.grid.shape[0]}x{out.grid.shape[1]} 1 mm grid; "
          f"{len(measured.measurements)} measurements; {ns.threads} threads, median of {ns.repeats}")
    print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()) + f"; total {sum(med.values()):.3f} s per series")


if __name__ == "__main__":
    main()
