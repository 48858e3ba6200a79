"""Concurrent-ingest benchmark: 1 against 10 senders, DCMTK storescp and Orthanc in the same run, a 1000-image study.

Run with ``.venv/bin/python -m tests.bench.ingest_parallel`` (or ``make bench``). Every
sender is one DCMTK ``storescu`` with its own association and its own series of 512x512 MR
images (about 512 KB each, uncompressed), all started together; everything runs on loopback
with ``TCP_NODELAY=1`` for the DCMTK programs. It prints, all in one run:

1. aggregate instances/s (median of ``--rounds`` rounds) with 1, 4 and 10 senders of DCMTK
   ``storescp`` (no fsync), of Orthanc (one association) and of the Discus listener (fsync on;
   one process, and ``--processes`` processes sharing the port), each with the receiver's CPU
   milliseconds per instance (its whole process tree) and how many cores were busy during the
   transfer, so that a slowdown with 10 senders can be set against what the CPU explains, and
   what one write + fsync + rename + folder fsync costs on the disk at that moment;
2. a ``--study``-image study (one series; one run per ``--study-senders`` count) sent to the
   listener with Redis, a quiet period of ``--quiet`` s and no worker: seconds from the first
   instance sent to the last Success (received, fsynced, indexed) and to the analysis job
   being in the Celery queue in Redis (queued), and the latter less the quiet period.

Ratios are taken within the run; the load average at the start and end is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tests.bench.ingest import Discus, Storescp, make_series, send_rate, wait_port
from tests.conftest import Orthanc, RedisServer

_TICK = os.sysconf("SC_CLK_TCK")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every live descendant."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parent[int(entry)] = int(st[1])
    total = 0.0
    for pid in parent:
        p = pid
        while p not in (root, 0, 1) and p in parent:
            p = parent[p]
        if p == root and (st := _stat(pid)) is not None:
            total += (int(st[11]) + int(st[12])) / _TICK
    return total


def busy_cores() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def fsync_probe(folder: Path, size: int, n: int = 30) -> float:
    """Median ms to write, fsync, rename a ``size``-byte file and fsync its folder, as the spool does."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        tmp = folder / f".{i}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{i}.dcm")
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - t0)
    shutil.rmtree(folder)
    return 1000 * statistics.median(times)


def measure(port: int, called: str, batches: list[list[Path]], receiver_pids: list[int]) -> dict[str, float]:
    """Send every batch over its own association at once; rate, receiver CPU and machine load."""
    cpu0 = sum(tree_cpu(p) for p in receiver_pids)
    b0, t0 = busy_cores()
    rate = send_rate(port, batches, called)
    b1, t1 = busy_cores()
    n = sum(len(b) for b in batches)
    cpu = sum(tree_cpu(p) for p in receiver_pids) - cpu0
    return {"rate": rate, "cpu_ms": 1000 * cpu / n, "busy": (b1 - b0) / max(t1 - t0, 1) * os.cpu_count()}


def bench_senders(tmp: Path, counts: list[int], per_sender: int, size: int, processes: int, redis_url: str,
                  rounds: int) -> None:
    most = max(counts)
    print(f"== senders: {counts} storescu at once, {per_sender} instances of {size}x{size} MR each "
          f"({per_sender * size * size * 2 / 1e6:.0f} MB per sender); {rounds} rounds, medians ==", flush=True)
    series = [make_series(tmp / f"series{k}", per_sender, size, f"par{k}") for k in range(most)]
    print(f"write + fsync + rename + folder fsync of one {size * size * 2 // 1024} KB file on this disk now: "
          f"{fsync_probe(tmp / 'probe', size * size * 2):.1f} ms (median of 30)", flush=True)
    runs: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for _ in range(rounds):  # every receiver in every round, so that they share the machine's load
        scp = Storescp(tmp)
        try:
            for n in counts:
                runs["DCMTK storescp (no fsync)"][n].append(measure(scp.port, "STORESCP", series[:n], [scp.proc.pid]))
        finally:
            scp.stop()
            shutil.rmtree(tmp / "storescp")
        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        try:
            runs["Orthanc"][1].append(measure(orthanc.dicom_port, "ORTHANC", series[:1], [orthanc.proc.pid]))
        finally:
            orthanc.stop()
            shutil.rmtree(tmp / "orthanc")
        for procs in sorted({1, processes}):
            for n in counts:
                d = Discus(tmp, redis_url, None, processes=procs, quiet=3600)  # a fresh spool per run
                d.start("listen")
                wait_port(d.port)
                time.sleep(2.0 if procs > 1 else 0.2)  # let the other processes start and bind the port too
                try:
                    runs[f"Discus listener x{procs} (fsync)"][n].append(
                        measure(d.port, "DISCUS", series[:n], [p.pid for p in d.procs]))
                finally:
                    d.stop()
                    shutil.rmtree(tmp / f"var-{d.port}", ignore_errors=True)
    rows = {name: {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in per.items()}
            for name, per in runs.items()}
    spread = {name: {n: (min(r["rate"] for r in rs), max(r["rate"] for r in rs)) for n, rs in per.items()}
              for name, per in runs.items()}

    width = max(map(len, rows))
    print(f"{'receiver':<{width}}  " + "".join(f"{f'{n} sender' + ('s' if n > 1 else ''):>34}" for n in counts))
    print(f"{'':<{width}}  " + "".join(f"{'inst/s  CPU ms/inst  cores busy':>34}" for _ in counts))
    for name, per in rows.items():
        cells = [f"{per[n]['rate']:10.1f} {per[n]['cpu_ms']:12.2f} {per[n]['busy']:10.2f}" if n in per else f"{'-':>34}"
                 for n in counts]
        print(f"{name:<{width}}  " + "".join(f"{c:>34}" for c in cells))
    print("range of inst/s over the rounds: " + "; ".join(
        f"{name} " + ", ".join(f"{n}: {lo:.0f}-{hi:.0f}" for n, (lo, hi) in per.items()) for name, per in spread.items()))
    scp_rates = rows["DCMTK storescp (no fsync)"]
    for name, per in rows.items():
        if not name.startswith("Discus"):
            continue
        one = per[1]
        print(f"{name}: {most} senders / 1 sender {per[most]['rate'] / one['rate']:.2f} "
              f"(storescp {scp_rates[most]['rate'] / scp_rates[1]['rate']:.2f}); CPU per instance "
              f"{per[most]['cpu_ms'] / one['cpu_ms']:.2f} x; vs Orthanc (1 association) "
              f"{one['rate'] / rows['Orthanc'][1]['rate']:.2f}; vs storescp "
              + ", ".join(f"{n} sender{'s' if n > 1 else ''} {per[n]['rate'] / scp_rates[n]['rate']:.2f}"
                          for n in counts))


def bench_study(tmp: Path, n: int, size: int, senders: int, quiet: float, processes: int, redis_url: str) -> None:
    import pydicom

    from worker.index import StudyIndex

    print(f"== study: {n} instances of {size}x{size} MR ({n * size * size * 2 / 1e6:.0f} MB), {senders} "
          f"association{'s' if senders > 1 else ''}, listener x{processes}, quiet period {quiet} s ==", flush=True)
    files = make_series(tmp / "study", n, size, f"study{n}-{senders}")  # a new study per run
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    d = Discus(tmp, redis_url, None, processes=processes, quiet=quiet)
    d.start("listen")
    wait_port(d.port)
    time.sleep(1.0 if processes > 1 else 0.2)
    idx = StudyIndex.from_url(redis_url)
    try:
        t0 = time.time()
        send_rate(d.port, [files[k::senders] for k in range(senders)], "DISCUS")
        t_received = time.time()
        deadline = time.monotonic() + 120
        while True:
            try:
                job = idx.job(uid, 1)
            except Exception:  # not claimed yet
                job = {}
            if job.get("task_id"):
                t_queued = time.time()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the study was not queued within 120 s")
            time.sleep(0.01)
        study = idx.study(uid)
    finally:
        d.stop()
    print(f"indexed instances {study.get('instances')}; first sent -> last Success (received) "
          f"{t_received - t0:.2f} s ({n / (t_received - t0):.0f} instances/s); -> queued "
          f"{t_queued - t0:.2f} s, less the quiet period {t_queued - t0 - quiet:.2f} s "
          f"(last instance -> claim {float(job['queued_at']) - float(study['last_seen']):.2f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument("--per-sender", type=int, default=60, help="instances each sender sends")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every receiver and sender count")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2, help="listener processes (one per core here)")
    parser.add_argument("--study", type=int, default=1000, help="images of the received-and-queued study")
    parser.add_argument("--study-senders", type=int, nargs="+", default=[1, 4],
                        help="associations the study is sent over, one run each")
    parser.add_argument("--quiet", type=float, default=1.0, help="quiet period of the study run")
    parser.add_argument("--skip-senders", action="store_true")
    parser.add_argument("--skip-study", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "Orthanc", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (make install)")
    if 1 not in args.senders:
        args.senders = [1, *args.senders]
    print(f"{os.cpu_count()} cores; load average at start {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="discus-bench-") as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        try:
            if not args.skip_senders:
                bench_senders(Path(tmp), sorted(set(args.senders)), args.per_sender, args.size, args.processes,
                              redis.url, args.rounds)
            if not args.skip_study:
                for senders in args.study_senders:
                    bench_study(Path(tmp), args.study, args.size, senders, args.quiet, args.processes, redis.url)
                    shutil.rmtree(Path(tmp) / "study")
        finally:
            redis.stop()
    print(f"load average at end {_load()}")


if __name__ == "__main__":
    main()
