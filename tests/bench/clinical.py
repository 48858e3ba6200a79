"""Clinical-size MR benchmark: worker time and peak RSS on a clinical-size study, and worker start-up.

Run with ``.venv/bin/python -m tests.bench.clinical`` (or ``make bench``). Each part runs in
its own Python process, so its imports and peak memory are its own. It prints:

1. start-up, in a fresh process: seconds to import the worker's modules (Celery app, torch,
   the pipeline with pydicom and highdicom), to load each model package (one line per
   package, slowest first), to warm the SR/SC encoders, and the RSS then; with
   ``--worker`` (needs redis-server) also the wall time from starting ``discus worker
   --queues analyze`` to its ready line in the log;
2. worker time per study with every installed package loaded (warm), in one process:
   :func:`worker.pipeline.analyze_study` plus :func:`worker.pipeline.encode_outputs` on
   the default phantom MR study (65 images, uncompressed), on the clinical-size study of
   the same seed (``write_demo_study(..., profile="clinical")``: 252 images of 512 x 512,
   JPEG 2000 lossless) and on that study less the series no selection rule gives a role
   (the localizer and the axial T1: what the product does not use), runs alternated so they
   share the machine's load; median and per-stage medians (``result.timings``), the ratios between
   them, and the process's peak RSS (``ru_maxrss``).

The target of (2): the clinical study's worker time within 1.0 s less the queue and export
plumbing (``tests/bench/ingest.py``'s latency run measures those), peak RSS under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The study variants of the pipeline part, in the order they are printed.
VARIANTS = ("default", "clinical", "clinical less extras")


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _child(*args: str) -> None:
    """Run a part of this benchmark in a fresh interpreter, its output going to ours."""
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "tests.bench.clinical", *args], cwd=ROOT, check=True)


# ----------------------------------------------------------------------------- parts


def part_write(folder: Path, seed: int, transfer_syntax: str | None) -> None:
    from dicom_io.phantom import write_demo_study
    from dicom_io.results import SeriesRoleValues
    from dicom_io.selection import assign_roles
    from dicom_io.study import Study

    for name, profile in (("default", "default"), ("clinical", "clinical")):
        t0 = time.perf_counter()
        truth = json.loads(write_demo_study(folder / name, "MR", seed, profile=profile,
                                            transfer_syntax=transfer_syntax if profile == "clinical" else None
                                            ).read_text())
        size = sum(f.stat().st_size for f in (folder / name).rglob("*.dcm"))
        print(f"{name} study written in {time.perf_counter() - t0:.1f} s: "
              f"{sum(s['instances'] for s in truth['series'])} images, {size / 1e6:.0f} MB, "
              f"transfer syntax {truth.get('transfer_syntax', 'explicit VR little endian')}; "
              + ", ".join(f"{s['description']} {s['instances']}" for s in truth["series"]), flush=True)
    # The same study less the series without a role: what those extras cost is the difference.
    study = Study.from_folder(folder / "clinical")
    assign_roles(study)
    used = {s.series_instance_uid for s in study.series if s.role is not SeriesRoleValues.OTHER}
    kept = folder / "clinical-less-extras"
    kept.mkdir()
    for s in study.series:
        if s.series_instance_uid in used:
            for inst in s.instances:
                dst = kept / inst.path.parent.name / inst.path.name
                dst.parent.mkdir(exist_ok=True)
                dst.symlink_to(inst.path)
    print(f"less extras: {', '.join(s.description for s in study.series if s.series_instance_uid in used)} "
          f"({sum(1 for _ in kept.rglob('*.dcm'))} images)", flush=True)
    decode_times(next((folder / "clinical").glob("03-*/0010.dcm")))


def decode_times(path: Path, repeats: int = 10) -> None:
    """Median ms to read and decode one image file per lossless transfer syntax (what "volumes" pays)."""
    import io

    import pydicom
    from pydicom.uid import UID, ExplicitVRLittleEndian

    from dicom_io.phantom import LOSSLESS_TRANSFER_SYNTAXES

    pixels = pydicom.dcmread(path).pixel_array
    out = []
    for uid in (ExplicitVRLittleEndian, *LOSSLESS_TRANSFER_SYNTAXES):
        ds = pydicom.dcmread(path)
        if uid == ExplicitVRLittleEndian:
            ds.decompress(generate_instance_uid=False)
        elif ds.file_meta.TransferSyntaxUID != uid:
            ds.decompress(generate_instance_uid=False)
            ds.compress(uid, generate_instance_uid=False)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            arr = pydicom.dcmread(io.BytesIO(data)).pixel_array
            times.append(time.perf_counter() - t0)
        assert (arr == pixels).all()
        out.append(f"{UID(uid).name} {1000 * statistics.median(times[1:]):.1f} ms ({len(data) // 1024} KB)")
    print(f"read + decode one {pixels.shape[0]}x{pixels.shape[1]} image: " + "; ".join(out), flush=True)


def part_startup() -> None:
    t_all = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(name: str, fn) -> object:
        t0 = time.perf_counter()
        out = fn()
        steps.append((name, time.perf_counter() - t0))
        return out

    step("import worker.celery_app (Celery, settings)", lambda: __import__("worker.celery_app"))
    step("import torch", lambda: __import__("torch"))
    step("import worker.pipeline (pydicom, highdicom, models)", lambda: __import__("worker.pipeline"))
    # What a classifier package's loader imports first: Grad-CAM brings torchvision and scikit-learn.
    step("import models.predictor (pytorch_grad_cam)", lambda: __import__("models.predictor"))
    step("import the other model loaders", lambda: [__import__(m) for m in (
        "models.localizer", "models.disc_grading", "models.segmentation")])
    from worker.model_packages import TASKS, ModelPackages

    loads: list[tuple[str, float, str]] = []
    for task in TASKS:
        t0 = time.perf_counter()
        packages = ModelPackages(tasks=(task,))
        loads.append((task, time.perf_counter() - t0,
                      "loaded" if task in packages.loaded else f"missing: {packages.missing.get(task)}"))
    steps.append(("load every model package", sum(t for _, t, _ in loads)))
    from dicom_io.outputs import warm_up

    step("warm the SR/SC encoders", warm_up)
    total = time.perf_counter() - t_all
    print(f"start-up in a fresh process (load average {_load()}): {total:.2f} s, RSS then {_rss_mb():.0f} MB")
    for name, t in steps:
        print(f"  {name:<52} {t:6.2f} s  {100 * t / total:3.0f}%")
    print("  model packages, slowest first:")
    for task, t, state in sorted(loads, key=lambda x: -x[1]):
        print(f"    {task:<24} {t:6.3f} s  {state}")


def part_pipeline(folder: Path, repeats: int, threads: int, demo: bool) -> None:
    import torch

    from worker.model_packages import ModelPackages
    from worker.pipeline import analyze_study, encode_outputs

    torch.set_num_threads(threads)
    settings = types.SimpleNamespace(report_synthetic_models=True) if demo else None
    t0 = time.perf_counter()
    packages = ModelPackages()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; packages loaded in "
          f"{time.perf_counter() - t0:.2f} s: {len(packages.loaded)} ({', '.join(sorted(packages.loaded))}); "
          f"missing: {sorted(packages.missing) or '-'}; settings: {'demo (phantom-trained analyses report)' if demo else 'site default'}")
    rss_loaded = _rss_mb()
    print(f"peak RSS with every package loaded: {rss_loaded:.0f} MB; load average {_load()}", flush=True)
    studies = dict(zip(VARIANTS, (folder / "default", folder / "clinical", folder / "clinical-less-extras")))
    totals: dict[str, list[float]] = defaultdict(list)
    stages: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i in range(repeats + 1):  # the first round warms caches and is not counted
        for name, study in studies.items():
            t0 = time.perf_counter()
            result = analyze_study(study, 1, packages=packages, settings=settings)
            t1 = time.perf_counter()
            files = encode_outputs(result, study, folder / f"out-{i}-{name.replace(' ', '_')}")
            t2 = time.perf_counter()
            if i == 0:
                print(f"{name}: status {result.status.value}; levels {len(result.levels)}; findings "
                      f"{len(result.findings)}; outputs {len(files)}; roles "
                      + ", ".join(f"{u.role.value}={u.description}" for u in result.series if u.role.value != "OTHER")
                      + (f"; reason: {result.reason}" if result.reason else ""), flush=True)
                continue
            totals[name].append(t2 - t0)
            for k, v in result.timings.items():
                stages[name][k].append(v)
            stages[name]["encode"].append(t2 - t1)
    print(f"\nworker time per study (median of {repeats}, analysis + encoding; load average {_load()}):")
    med = {name: statistics.median(totals[name]) for name in studies}
    keys = sorted({k for name in studies for k in stages[name]}, key=lambda k: -statistics.median(stages["clinical"].get(k, [0.0])))
    print(f"  {'stage':<12}" + "".join(f"{name:>28}" for name in studies))
    print(f"  {'all':<12}" + "".join(f"{med[name]:27.3f}s" for name in studies))
    for k in keys:
        print(f"  {k:<12}" + "".join(f"{statistics.median(stages[name][k]):27.3f}s" if k in stages[name] else f"{'-':>28}"
                                     for name in studies))
    print(f"  clinical / default: {med['clinical'] / med['default']:.2f}; clinical / less extras: "
          f"{med['clinical'] / med['clinical less extras']:.2f} "
          f"(extras cost {med['clinical'] - med['clinical less extras']:+.3f} s)")
    rss = _rss_mb()
    print(f"peak RSS of this worker-like process: {rss:.0f} MB (after loading {rss_loaded:.0f} MB), "
          f"target < 2048 MB: {'met' if rss < 2048 else 'NOT met'}")


def part_worker() -> None:
    """Wall time from ``discus worker --queues analyze`` to its analysis process's ready line."""
    from tests.bench.ingest import Discus, wait_ready
    from tests.conftest import RedisServer

    with tempfile.TemporaryDirectory(prefix="discus-bench-") as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        d = Discus(Path(tmp), redis.url, None)
        try:
            t0 = time.perf_counter()
            d.start("worker", "--queues", "analyze")
            wait_ready(d.tmp / f"worker-analyze-{d.port}.log")
            print(f"`discus worker --queues analyze` to ready (models loaded, encoders warm): "
                  f"{time.perf_counter() - t0:.2f} s (load average {_load()})")
        finally:
            d.stop()
            redis.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="counted runs per study (after one warm-up run)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--transfer-syntax", default=None,
                    help="of the clinical study (default: the profile's, JPEG 2000 lossless)")
    ap.add_argument("--demo", action="store_true",
                    help="the demo's settings (phantom-trained analyses report) instead of a site's default")
    ap.add_argument("--worker", action="store_true",
                    help="also time a real `discus worker` from start to ready (starts redis-server)")
    ap.add_argument("--part", choices=("all", "write", "startup", "pipeline", "worker"), default="all",
                    help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.part == "write":
        part_write(ns.folder, ns.seed, ns.transfer_syntax)
    elif ns.part == "startup":
        part_startup()
    elif ns.part == "pipeline":
        part_pipeline(ns.folder, ns.repeats, ns.threads, ns.demo)
    elif ns.part == "worker":
        part_worker()
    else:
        print(f"clinical benchmark: seed {ns.seed}, repeats {ns.repeats}, threads {ns.threads}, "
              f"{'demo' if ns.demo else 'site default'} settings; load average {_load()}", flush=True)
        _child("--part", "startup")
        if ns.worker:
            _child("--part", "worker")
        with tempfile.TemporaryDirectory(prefix="discus-clinical-") as tmp:
            common = ["--folder", tmp, "--seed", str(ns.seed)]
            _child("--part", "write", *common,
                   *(["--transfer-syntax", ns.transfer_syntax] if ns.transfer_syntax else []))
            _child("--part", "pipeline", *common, "--repeats", str(ns.repeats), "--threads", str(ns.threads),
                   *(["--demo"] if ns.demo else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
