"""Level localizer benchmark: seconds per sagittal series on this machine's CPU.

Run with ``.venv/bin/python -m tests.bench.localizer``. It prints, for the shipped
package, the median and 95th-percentile wall time of one localization for

1. clinical-like series: 15 slices of 4 mm, 512x512 pixels of 0.6 mm (synthetic intensities),
2. the real 1 mm isotropic volumes of ``../shared/data/lumbar-mri-levels`` when present
   (re-slabbed to 4 mm inside the localizer), with their identification rate.

The target is under 1 s per series with ``torch`` limited to 2 threads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from models.localizer import LevelLocalizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data" / "lumbar-mri-levels"
PACKAGE = ROOT / "models" / "packages" / "levels"


def _stats(times: list[float]) -> str:
    t = np.asarray(times)
    return f"median {np.median(t):.3f} s, p95 {np.percentile(t, 95):.3f} s, n={len(t)}"


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, default=PACKAGE)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--real", type=int, default=10, help="real volumes to time (0: none)")
    ns = p.parse_args(args)
    torch.set_num_threads(ns.threads)
    loc = LevelLocalizer.from_package(ns.package)

    rng = np.random.default_rng(0)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = [0, 0.6, 0], [0, 0, -0.6], [4.0, 0, 0]
    arr = rng.normal(300, 80, (15, 512, 512)).clip(0).astype(np.float32)
    loc(arr, aff)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        loc(arr, aff)
        times.append(time.perf_counter() - t0)
    print(f"clinical-like 15x512x512 (4 mm, 0.6 mm px): {_stats(times)}")

    if ns.real and (DATA / "levels.json").is_file():
        from training.levels import load_cases, localize_case, score_case, summarise

        every = load_cases(DATA)
        cases = every[:: max(1, len(every) // ns.real)][: ns.real]  # spread over both datasets
        scores, times = [], []
        for c in cases:
            res, sec = localize_case(loc, c)
            times.append(sec)
            scores.append(score_case(c, res, sec))
        m = summarise(scores, cases)
        print(f"real 1 mm volumes: {_stats(times)}; id_rate {m['id_rate']:.3f}, "
              f"mean error {m['mean_error_mm']:.2f} mm (a mix of training and held-out cases: not a validation figure)")
    elif ns.real:
        print(f"real volumes skipped: {DATA.resolve()} not found")


if __name__ == "__main__":
    main()
