"""Benchmark: the worker's time per study (analysis + SR/SC encoding), by stage, and its peak RSS.

Writes synthetic studies with the phantom (MR: sagittal T2 and T1 of 15 slices
and an axial T2 stack; CT: an axial stack; X-ray: AP and lateral), loads the
installed model packages once (a warm worker), then runs
:func:`worker.pipeline.analyze_study` and :func:`worker.pipeline.encode_outputs`
several times per study and prints the median and the per-stage medians.

Run: ``python -m tests.bench.pipeline [--repeats 5] [--modalities MR CT DX] [--device cpu]``.
Targets (issue 6): MR < 20 s, CT < 15 s, X-ray < 3 s on a 2-core CPU; RSS < 3 GB; MR < 2 s on a GPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TARGET_S = {"MR": 20.0, "CT": 15.0, "DX": 3.0}


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _count(folder: Path) -> dict[str, int]:
    import pydicom

    per: dict[str, int] = defaultdict(int)
    for f in folder.rglob("*.dcm"):
        per[str(pydicom.dcmread(f, stop_before_pixels=True).get("SeriesDescription", "?"))] += 1
    return dict(per)


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modalities", nargs="+", default=["MR", "CT", "DX"], choices=["MR", "CT", "DX"])
    ap.add_argument("--device", default=None, help="torch device for the models (default: each package's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=11)
    ns = ap.parse_args(args)

    import torch

    from dicom_io.phantom import write_demo_study
    from worker.model_packages import ModelPackages
    from worker.pipeline import analyze_study, encode_outputs

    torch.set_num_threads(ns.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}, device {ns.device or 'default'}")
    t0 = time.perf_counter()
    packages = ModelPackages(device=ns.device)
    print(f"model packages loaded in {time.perf_counter() - t0:.2f} s: {sorted(packages.loaded)}; "
          f"missing: {sorted(t for t in packages.missing)}")
    print(f"RSS after loading models: {_rss_mb():.0f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        for modality in ns.modalities:
            folder = Path(tmp) / modality
            t0 = time.perf_counter()
            write_demo_study(folder, modality, seed=ns.seed)
            print(f"\n== {modality}: study written in {time.perf_counter() - t0:.2f} s; "
                  f"images per series: {_count(folder)}")
            totals: list[float] = []
            stages: dict[str, list[float]] = defaultdict(list)
            n_out = 0
            for i in range(ns.repeats + 1):  # the first run warms caches and is not counted
                t0 = time.perf_counter()
                result = analyze_study(folder, 1, packages=packages)
                t1 = time.perf_counter()
                files = encode_outputs(result, folder, Path(tmp) / f"out-{modality}-{i}")
                t2 = time.perf_counter()
                if i == 0:
                    print(f"status {result.status.value}; levels {len(result.levels)}; "
                          f"findings {len(result.findings)}; heatmaps "
                          f"{sum(f.heatmap is not None for f in result.findings)}; outputs {len(files)}; "
                          f"not run: {result.not_run or '-'}")
                    if result.reason:
                        print(f"reason: {result.reason}")
                    continue
                totals.append(t2 - t0)
                for k, v in result.timings.items():
                    stages[k].append(v)
                stages["encode"].append(t2 - t1)
                n_out = len(files)
            med = statistics.median(totals)
            print(f"worker time per study: median {med:.2f} s (min {min(totals):.2f}, max {max(totals):.2f}, "
                  f"n={len(totals)}), target < {TARGET_S[modality]:.0f} s: "
                  f"{'met' if med < TARGET_S[modality] else 'NOT met'}; {n_out} output objects")
            for k in sorted(stages, key=lambda k: -statistics.median(stages[k])):
                print(f"  {k:<10} {statistics.median(stages[k]):7.3f} s")
    rss = _rss_mb()
    print(f"\npeak RSS of this (worker-like) process: {rss:.0f} MB, target < 3072 MB: "
          f"{'met' if rss < 3072 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
