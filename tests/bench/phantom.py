"""Synthetic study benchmark: seconds to render and to write phantom studies on this CPU.

Run with ``.venv/bin/python -m tests.bench.phantom``. It prints the median and
maximum wall time over a few seeds of

1. rendering a whole MR study (sagittal T2 and T1 sharing one label map, axial T2),
2. rendering a CT study and a DX study (AP and lateral),
3. ``write_demo_study`` for each modality (rendering plus DICOM files on disk).

The target is under 3 s to render a full MR study.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from dicom_io.phantom import make_anatomy, random_findings, render_ct, render_dx, render_mr, write_demo_study


def _time(fn: Callable[[int], object], seeds: list[int]) -> str:
    times = []
    for seed in seeds:
        t0 = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - t0)
    return f"median {statistics.median(times):6.2f} s   max {max(times):6.2f} s   (n={len(times)})"


def _mr(seed: int) -> None:
    import numpy as np

    an = make_anatomy(seed, random_findings(np.random.default_rng(seed)))
    render_mr(an, "T2", "sagittal")
    render_mr(an, "T1", "sagittal")
    render_mr(an, "T2", "axial")


def _ct(seed: int) -> None:
    render_ct(make_anatomy(seed))


def _dx(seed: int) -> None:
    an = make_anatomy(seed)
    render_dx(an, "AP")
    render_dx(an, "LAT")


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per measurement")
    ns = parser.parse_args(args)
    seeds = list(range(100, 100 + ns.runs))
    print(f"render MR study (SAG T2, SAG T1, AX T2): {_time(_mr, seeds)}")
    print(f"render CT axial study:                   {_time(_ct, seeds)}")
    print(f"render DX study (AP, lateral):           {_time(_dx, seeds)}")
    with tempfile.TemporaryDirectory(prefix="discus-bench-") as tmp:
        for modality in ("MR", "CT", "DX"):
            line = _time(lambda s: write_demo_study(Path(tmp) / f"{modality}{s}", modality, s), seeds)
            print(f"write_demo_study {modality}:                     {line}")


if __name__ == "__main__":
    main()
