"""Ingest benchmark: the listener against DCMTK storescp and Orthanc, and study latency.

Run with ``.venv/bin/python -m tests.bench.ingest`` (or ``make bench``). It prints:

1. one association, a 200-instance 512x512 MR series (about 512 KB each) sent by DCMTK
   ``storescu``: instances/s of DCMTK ``storescp``, Orthanc and the Discus listener (fsync on),
   all in the same run, and the listener's ratio to each;
2. four concurrent senders (four different series): aggregate instances/s of storescp and of
   the listener (one process, then ``listener_processes`` processes sharing the port);
3. latency from the last instance's Success to the SR stored in Orthanc, with its stages
   (quiet period, queue wait, analysis, encoding, export, PACS indexing).

Everything runs on loopback with ``TCP_NODELAY=1`` for the DCMTK programs (DESIGN.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.conftest import NODELAY_ENV, ROOT, Orthanc, RedisServer, free_port, port_open

ENV = {**os.environ, **NODELAY_ENV, "OMP_NUM_THREADS": "1"}


def make_series(out: Path, n: int, size: int, salt: str) -> list[Path]:
    """``n`` sagittal MR slices of ``size`` x ``size`` uint16 with full geometry."""
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=["bench-study", salt])
    series = generate_uid(entropy_srcs=["bench-series", salt])
    frame = generate_uid(entropy_srcs=["bench-frame", salt])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4000, size=(size, size), dtype=np.uint16).tobytes()
    files = []
    for i in range(n):
        ds = Dataset()
        sop = generate_uid(entropy_srcs=["bench-sop", salt, str(i)])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "BENCH", "Bench^Mark"
        ds.StudyDate, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "20240101", "SAG T2", 1, i + 1
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-50 + i * 0.5, -128, 128]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 0.5
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels
        p = out / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port} after {timeout} s")
        time.sleep(0.05)


def wait_ready(log: Path, timeout: float = 600) -> None:
    """Wait until the worker's analysis process has loaded its models (start-up is not counted)."""
    from worker.celery_app import READY_LINE

    deadline = time.monotonic() + timeout
    while not (log.is_file() and READY_LINE in log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not get ready in {timeout} s (see {log})")
        time.sleep(0.2)


def storescu(port: int, files: list[Path], called: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                             *map(str, files)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def send_rate(port: int, batches: list[list[Path]], called: str) -> float:
    """Aggregate instances/s of one storescu per batch, all started together."""
    t0 = time.perf_counter()
    procs = [storescu(port, b, called) for b in batches]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


class Storescp:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        out = tmp / "storescp"
        out.mkdir()
        self.proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(self.port)],
                                     env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Discus:
    """A configuration plus listener (and optionally worker) subprocesses."""

    def __init__(self, tmp: Path, redis_url: str, orthanc: Orthanc | None, processes: int = 1,
                 quiet: float = 1.0) -> None:
        self.port = free_port()
        self.config = tmp / f"discus-{self.port}.toml"
        lines = [f'port = {self.port}', f'data_dir = "{tmp / f"var-{self.port}"}"',
                 f'redis_url = "{redis_url}"', f"quiet_period = {quiet}", "monitor_interval = 0.05",
                 f"listener_processes = {processes}", "max_associations = 16"]
        if orthanc is not None:
            lines += ["", "[[destinations]]", 'name = "orthanc"', f"port = {orthanc.dicom_port}"]
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {**ENV, "DISCUS_CONFIG": str(self.config)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = tmp

    def start(self, *args: str) -> None:
        name = args[0] + (f"-{args[2]}" if args[0] == "worker" and len(args) > 2 else "")
        log = open(self.tmp / f"{name}-{self.port}.log", "ab")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=ROOT,
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def bench_throughput(tmp: Path, n: int, size: int, senders: int, processes: int) -> None:
    print(f"== ingest: {n} instances of {size}x{size} MR ({n * size * size * 2 / 1e6:.0f} MB) ==")
    series = [make_series(tmp / f"series{k}", n, size, f"s{k}") for k in range(senders)]
    redis = RedisServer(tmp / "redis")
    redis.start()
    rates: dict[str, float] = {}
    try:
        scp = Storescp(tmp)
        rates["storescp, 1 association"] = send_rate(scp.port, series[:1], "STORESCP")
        rates[f"storescp, {senders} senders"] = send_rate(scp.port, series, "STORESCP")
        scp.stop()

        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        try:
            rates["Orthanc, 1 association"] = send_rate(orthanc.dicom_port, series[:1], "ORTHANC")
        finally:
            orthanc.stop()

        for procs in sorted({1, processes}):
            d = Discus(tmp, redis.url, None, processes=procs, quiet=3600)  # own spool each
            d.start("listen")
            wait_port(d.port)
            time.sleep(1.0 if procs > 1 else 0.2)  # let the other processes bind the port too
            try:
                if procs == 1:
                    rates["Discus listener (fsync), 1 association"] = send_rate(d.port, series[:1], "DISCUS")
                    d.stop()  # a fresh spool for the concurrent run
                    d = Discus(tmp, redis.url, None, processes=procs, quiet=3600)
                    d.start("listen")
                    wait_port(d.port)
                rates[f"Discus listener x{procs} (fsync), {senders} senders"] = send_rate(
                    d.port, series, "DISCUS")
            finally:
                d.stop()
    finally:
        redis.stop()
    width = max(map(len, rates))
    for name, rate in rates.items():
        print(f"{name:<{width}}  {rate:8.1f} instances/s")
    one = rates["Discus listener (fsync), 1 association"]
    print(f"listener / storescp (1 association): {one / rates['storescp, 1 association']:.2f}")
    print(f"listener / Orthanc   (1 association): {one / rates['Orthanc, 1 association']:.2f}")
    best = max(v for k, v in rates.items() if k.startswith("Discus") and "senders" in k)
    print(f"listener / storescp ({senders} senders, best):  "
          f"{best / rates[f'storescp, {senders} senders']:.2f}")


def bench_latency(tmp: Path, quiet: float) -> None:
    print(f"== latency: last Success to SR in Orthanc (quiet period {quiet} s) ==")
    from worker.index import StudyIndex

    redis = RedisServer(tmp / "redis-lat")
    redis.start()
    orthanc = Orthanc(tmp / "orthanc-lat")
    d = Discus(tmp, redis.url, orthanc, quiet=quiet)
    orthanc.listener_port = d.port
    orthanc.start()
    try:
        d.start("listen")
        d.start("worker", "--queues", "analyze")  # as deployed: analysis and export processes
        d.start("worker", "--queues", "export")
        wait_port(d.port)
        wait_ready(d.tmp / f"worker-analyze-{d.port}.log")
        study_dir = tmp / "latency-study"
        try:
            from dicom_io.phantom import write_demo_study

            write_demo_study(study_dir, "MR", 3)
            what = "synthetic lumbar MR study"
        except ImportError:
            make_series(study_dir, 20, 256, "latency")
            what = "20-slice MR series (no phantom module)"
        files = sorted(p for p in study_dir.rglob("*.dcm"))
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        idx = StudyIndex.from_url(redis.url)
        send_rate(d.port, [files], "DISCUS")
        t_sent = time.time()
        deadline = time.monotonic() + 600
        while True:
            found = [t for t in orthanc.instances_of(uid) if str(t.get("Modality")) == "SR"]
            if found:
                t_seen = time.time()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no SR after 600 s")
            time.sleep(0.05)
        job = idx.job(uid, 1)
        for _ in range(100):  # the last export's bookkeeping may trail the PACS by a moment
            if job.get("done_at"):
                break
            time.sleep(0.05)
            job = idx.job(uid, 1)
        last_seen = float(idx.study(uid)["last_seen"])
        import json

        timings = json.loads(job["timings"])
        stages = {
            "quiet period (last instance -> claim)": float(job["queued_at"]) - last_seen,
            "queue wait (claim -> task start)": timings["queue_wait"],
            "analysis (pipeline)": timings["analysis"],
            "encode SR/SC": timings["encode"],
            "export (encoded -> last C-STORE done)": float(job.get("done_at", t_seen)) - float(job["encoded_at"]),
        }
        print(f"{what}: {len(files)} instances, {job.get('objects')} objects back, "
              f"result {job.get('result')}")
        for k, v in stages.items():
            print(f"  {k:<40} {v:7.3f} s")
        plumbing = stages["queue wait (claim -> task start)"] + stages["encode SR/SC"] + \
            stages["export (encoded -> last C-STORE done)"]
        print(f"  {'total, last Success -> SR in Orthanc':<40} {t_seen - t_sent:7.3f} s")
        print(f"  {'plumbing (queue + encode + export)':<40} {plumbing:7.3f} s")
    finally:
        d.stop()
        orthanc.stop()
        redis.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2, help="listener processes for the concurrent run (one per core here)")
    parser.add_argument("--quiet", type=float, default=1.0, help="quiet period for the latency run")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "Orthanc", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (make install)")
    with tempfile.TemporaryDirectory(prefix="discus-bench-") as tmp:
        if not args.skip_throughput:
            bench_throughput(Path(tmp), args.instances, args.size, args.senders, args.processes)
        if not args.skip_latency:
            bench_latency(Path(tmp), args.quiet)


if __name__ == "__main__":
    main()
