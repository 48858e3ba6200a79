"""Disc grading benchmark: seconds the sagittal disc grader adds to one MR study on this CPU.

Run with ``.venv/bin/python -m tests.bench.disc_grading``. On a real sagittal T2 volume of
``../shared/data/lumbar-mri-levels`` (or a synthetic phantom series when that is absent), the
level localizer finds the discs once; then the shipped ``mr_disc_grading`` package grades the
lumbar discs (crops, one batch through the network, domain check) and explains its abnormal
outputs (Grad-CAM), each timed over repeated runs after a warm-up. Target: under 1 s added to the
MR pipeline per study.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from models.disc_grading import DiscGrader
from models.localizer import LevelLocalizer
from worker.analysis_mr import abnormal_heads

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data" / "lumbar-mri-levels"
PACKAGES = ROOT / "models" / "packages"


def _volume() -> tuple[np.ndarray, np.ndarray, str]:
    nifti = DATA / "VB3-04.nii.gz"
    if nifti.exists():
        from dicom_io.writer import nifti_to_lps

        array, affine = nifti_to_lps(nifti)
        return np.asarray(array, np.float32), affine, f"real volume {nifti.name}, shape {array.shape}"
    from dicom_io import phantom

    s = phantom.render_mr(phantom.make_anatomy(3), "T2", "sagittal")
    return np.asarray(s.array, np.float32), np.asarray(s.affine), f"synthetic phantom, shape {s.array.shape}"


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    ns = p.parse_args(args)
    torch.set_num_threads(ns.threads)
    array, affine, what = _volume()
    located = LevelLocalizer.from_package(PACKAGES / "levels")(array, affine)
    points = {pt.name: pt.point_mm for pt in located.points}
    grader = DiscGrader.from_package(PACKAGES / "mr_disc_grading")
    grades = grader.grade(array, affine, points)
    if not grades:
        print(f"disc grading: {what}: the localizer named no lumbar disc; nothing to time")
        return
    pairs = abnormal_heads(grades) or [(0, "herniation")]  # what the pipeline explains
    heads = [h for _, h in pairs]
    crops = np.stack([grades[i].crop for i, _ in pairs])
    grader.explain(crops, heads)  # warm-up (first Grad-CAM builds its hooks)
    t_grade, t_explain = [], []
    for _ in range(ns.repeats):
        t0 = time.perf_counter()
        grader.grade(array, affine, points)
        t_grade.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        grader.explain(crops, heads)
        t_explain.append(time.perf_counter() - t0)
    med = float(np.median(t_grade)) + float(np.median(t_explain))
    print(f"disc grading ({what}, {len(grades)} discs, {ns.threads} threads, {ns.repeats} runs): "
          f"grade median {np.median(t_grade):.3f} s, Grad-CAM of {len(heads)} outputs median "
          f"{np.median(t_explain):.3f} s; added per study {med:.3f} s (target < 1 s)")


if __name__ == "__main__":
    main()
