"""SR and SC encoding benchmark: seconds per study to build and serialise the output objects.

Run with ``.venv/bin/python -m tests.bench.encoding``. For each study it prints the
median over ``--repeats`` runs (after one warm-up run) of

- SR: :func:`dicom_io.sr.encode_sr` plus the Part 10 bytes (:func:`dicom_io.sr.to_bytes`);
- SC: every heatmap SC and the key image, encoded and serialised, with the source
  pixels decoded anew in each run as the worker does;

and, in the same run, the SR through the previous construction (highdicom's SR
constructor given the whole content tree, one algorithm identification per group),
kept here only as the reference for the before/after ratio; both give the same bytes.

Studies:

1. ``phantom MR``: a synthetic MR study (``write_demo_study``) analysed once by the
   pipeline with the demo's settings (phantom-trained analyses allowed), i.e. the
   findings and heatmaps a demo study gets; skipped with ``--no-pipeline``.
2. ``fixture``: the encoder tests' full result (5 sagittal images 192x160, 30
   findings on five discs, each with a heatmap); no models needed.

The target is under 0.2 s per study for SR and SC together.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import pydicom
from pydicom.dataset import Dataset

from dicom_io import sr as sr_module
from dicom_io.outputs import warm_up
from dicom_io.results import StudyResult
from dicom_io.sc import count_outputs, iter_outputs
from dicom_io.sr import encode_sr, to_bytes

TARGET_S = 0.2


@contextlib.contextmanager
def previous_sr_path() -> Iterator[None]:
    """The SR construction before this benchmark's change, for the ratio only.

    highdicom's constructor gets the whole content tree (it deep-copies it, parses the
    copy and searches it for references) and every group builds its own algorithm
    identification.
    """
    group = sr_module._group

    def own_algorithm(result, finding, source, sop_uid, algorithm):  # type: ignore[no-untyped-def]
        return group(result, finding, source, sop_uid, sr_module._algorithm_id(result, finding))

    with mock.patch.object(sr_module, "_bare", lambda root: root), \
            mock.patch.object(sr_module, "_group", own_algorithm):
        yield


def _read(folder: Path) -> dict[str, Dataset]:
    """The study's instances as the worker reads them: headers, pixels deferred."""
    sources = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, defer_size="64 KB")
        sources[str(ds.SOPInstanceUID)] = ds
    return sources


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _medians(fns: list[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each timed function, run in turn ``repeats`` times after a warm-up."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            out.append(fn())
    return [statistics.median(t) for t in times]


def bench_study(name: str, result: StudyResult, read: Callable[[], dict[str, Dataset]], repeats: int) -> None:
    sources = read()
    ordered = [sources[k] for k in sorted(sources)]

    def sr_once() -> float:
        return _seconds(lambda: to_bytes(encode_sr(result, ordered)))

    n_sc = count_outputs(result, sources) - 1

    def sc_once() -> float:
        fresh = read()  # pixels are decoded again, as for a new study
        outputs = iter_outputs(result, fresh)
        next(outputs)  # the SR, timed above
        t0 = time.perf_counter()
        for ds in outputs:
            to_bytes(ds)
        return time.perf_counter() - t0

    def sr_before_once() -> float:
        with previous_sr_path():
            return sr_once()

    # Runs of the two SR paths alternate, so a change of load on the machine hits both.
    sr_s, sr_before = _medians([sr_once, sr_before_once], repeats)
    built = encode_sr(result, ordered)
    sr_bytes = _medians([lambda: _seconds(lambda: to_bytes(built))], repeats)[0]
    with previous_sr_path():
        same = to_bytes(encode_sr(result, ordered)) == to_bytes(built)
    sc_s = _medians([sc_once], repeats)[0]
    heatmaps = sum(f.heatmap is not None for f in result.findings)
    total = sr_s + sc_s
    print(f"{name}: {len(result.findings)} findings, {heatmaps} with a heatmap, {len(sources)} source images")
    print(f"  SR  median {sr_s:.3f} s, of which {sr_bytes:.3f} s writing the bytes (previous construction "
          f"{sr_before:.3f} s: {sr_before / sr_s:.1f} x; same bytes: {'yes' if same else 'NO'})")
    print(f"  SC  median {sc_s:.3f} s for {n_sc} objects ({sc_s / max(1, n_sc) * 1000:.0f} ms each)")
    print(f"  SR + SC {total:.3f} s per study, target < {TARGET_S} s: {'met' if total < TARGET_S else 'NOT met'}")


def _phantom_study(tmp: Path, seed: int) -> tuple[StudyResult, Path]:
    from dicom_io.phantom import write_demo_study
    from worker.model_packages import ModelPackages
    from worker.pipeline import analyze_study

    folder = tmp / "MR"
    write_demo_study(folder, "MR", seed=seed)
    result = analyze_study(folder, 1, packages=ModelPackages(),
                           settings=types.SimpleNamespace(report_synthetic_models=True))
    return result, folder


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--no-pipeline", action="store_true", help="skip the phantom study (needs the models)")
    ns = p.parse_args(args)
    warm_up()  # the worker does this once per process; its cost is not per study

    if not ns.no_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            result, folder = _phantom_study(Path(tmp), ns.seed)
            bench_study("phantom MR (demo settings)", result, lambda: _read(folder), ns.repeats)

    from tests.sr_sources import full_result, make_source

    images = [make_source(i) for i in range(5)]
    bench_study("fixture", full_result(images),
                lambda: {str(ds.SOPInstanceUID): ds for ds in (make_source(i) for i in range(5))}, ns.repeats)


if __name__ == "__main__":
    main()
