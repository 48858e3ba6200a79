"""Session fixtures that run the real programs Discus talks to, on loopback and free ports.

``redis_server`` and ``orthanc`` start real ``redis-server`` (append-only, temporary dir) and
``Orthanc`` (temporary storage, DICOMweb plugin, a modality entry for the listener). The
``discus`` factory writes a configuration file and runs the listener and Celery workers as
real subprocesses, so tests can kill them with SIGKILL. Everything is torn down after use.
A fixture skips only when the program it needs is not installed (``make test`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT / ".." / "shared" / "data"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
#: DCMTK and Orthanc leave Nagle's algorithm on unless told (see DESIGN.md).
NODELAY_ENV = {"TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a true value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # the thing polled is not up yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (make test installs it)")
    return path


class RedisServer:
    """A redis-server subprocess with append-only persistence in ``dir``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [need("redis-server"), str(ROOT / "deploy" / "redis.conf"), "--port", str(self.port),
             "--dir", str(self.dir), "--bind", "127.0.0.1"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT,
        )
        wait_for(lambda: port_open(self.port), 15, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Orthanc:
    """An Orthanc subprocess configured from ``deploy/orthanc.json``; stop/start keep its storage."""

    aet = "ORTHANC"

    def __init__(self, dir: Path, listener_aet: str = "DISCUS", listener_port: int = 11112) -> None:
        self.dir = dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.listener_aet = listener_aet
        self.listener_port = listener_port
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        template = string.Template((ROOT / "deploy" / "orthanc.json").read_text())
        text = template.substitute(
            ORTHANC_NAME="discus-test", ORTHANC_STORAGE=str(self.dir / "db"),
            ORTHANC_PLUGINS=str(ORTHANC_PLUGINS), ORTHANC_HTTP_PORT=self.http_port,
            ORTHANC_AET=self.aet, ORTHANC_DICOM_PORT=self.dicom_port,
            DISCUS_AET=self.listener_aet, DISCUS_PORT=self.listener_port,
        )
        json.loads(text)  # the template must stay valid JSON
        path = self.dir / "orthanc.json"
        path.write_text(text)
        return path

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # already running
        need("Orthanc")
        if not (ORTHANC_PLUGINS / "libOrthancDicomWeb.so").exists():
            pytest.skip("the Orthanc DICOMweb plugin (orthanc-dicomweb) is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        self.proc = subprocess.Popen(
            ["Orthanc", str(config)], cwd=self.dir, env={**os.environ, **NODELAY_ENV},
            stdout=open(self.dir / "orthanc.log", "ab"), stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.get("/system"), 30, "Orthanc")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def delete(self, path: str) -> None:
        req = urllib.request.Request(self.url + path, method="DELETE")
        urllib.request.urlopen(req, timeout=10).close()

    def clear(self) -> None:
        for study in self.get("/studies"):
            self.delete(f"/studies/{study}")

    def instances_of(self, study_uid: str) -> list[dict[str, Any]]:
        """Main DICOM tags of every instance Orthanc holds in the study ``study_uid``."""
        req = urllib.request.Request(
            self.url + "/tools/find", method="POST",
            data=json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                             "Expand": True}).encode(),
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            found = json.loads(resp.read())
        out = []
        for inst in found:
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            tags["OrthancID"] = inst["ID"]
            out.append(tags)
        return out

    def download(self, orthanc_id: str, path: Path) -> Path:
        with urllib.request.urlopen(f"{self.url}/instances/{orthanc_id}/file", timeout=10) as r:
            path.write_bytes(r.read())
        return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session (append-only, temporary dir, free port)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an emptied database on the session's Redis."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def listener_port() -> int:
    """The port the test listener uses; Orthanc's modality entry points at it."""
    return free_port()


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory, listener_port: int) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), listener_port=listener_port)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """The session's Orthanc, running and empty."""
    if orthanc_server.proc is None:
        orthanc_server.start()
    orthanc_server.clear()
    return orthanc_server


class Daemon:
    """A ``discus`` subprocess (listener or worker) with its log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env,
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return int(self.proc.returncode)

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


class Discus:
    """Configuration and processes of one test's Discus: listener, workers, CLI calls."""

    def __init__(self, tmp: Path, redis_url: str, orthanc: Orthanc | None, port: int,
                 overrides: dict[str, Any]) -> None:
        self.tmp = tmp
        self.port = port
        self.ae_title = "DISCUS"
        self.redis_url = redis_url
        self.settings: dict[str, Any] = {
            "ae_title": self.ae_title,
            "port": port,
            "bind": "127.0.0.1",
            "data_dir": str(tmp / "var"),
            "redis_url": redis_url,
            "quiet_period": 1.0,
            "monitor_interval": 0.2,
            "attempt_cap": 3,
            "analyze_soft_time_limit": 60.0,
            "analyze_time_limit": 70.0,
            "export_deadline": 30.0,
            "export_backoff_base": 0.5,
            "export_backoff_max": 2.0,
            "visibility_timeout": 8.0,
            "retention_period": 3600.0,
            "sweep_interval": 1.0,
            "destinations": [],
            # the studies of these tests are phantoms: let the phantom-trained analyses report on them
            "report_synthetic_models": True,
        }
        if orthanc is not None:
            self.settings["destinations"] = [
                {"name": "orthanc", "kind": "dicom", "host": "127.0.0.1",
                 "port": orthanc.dicom_port, "ae_title": orthanc.aet}
            ]
        self.settings.update(overrides)
        self.config = tmp / "discus.toml"
        self.write_config()
        self.daemons: list[Daemon] = []

    def write_config(self) -> None:
        lines = []
        tables = []
        for key, value in self.settings.items():
            if key == "destinations":
                for d in value:
                    tables.append("[[destinations]]\n" + "".join(
                        f"{k} = {json.dumps(v)}\n" for k, v in d.items()))
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        self.config.write_text("\n".join(lines) + "\n\n" + "\n".join(tables))

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **NODELAY_ENV, "DISCUS_CONFIG": str(self.config),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "COLUMNS": "250"}  # rich tables unfolded, so UIDs stay on one line

    @property
    def spool(self) -> Path:
        return self.tmp / "var" / "spool"

    @property
    def outbox(self) -> Path:
        return self.tmp / "var" / "outbox"

    def start_listener(self, name: str = "listener") -> Daemon:
        d = Daemon(["listen"], self.env, self.tmp / f"{name}.log")
        self.daemons.append(d)
        wait_for(lambda: port_open(self.port) or not d.alive(), 60, "the listener's port")
        if not d.alive():
            pytest.fail(f"listener exited:\n{d.tail()}")
        return d

    def start_worker(self, queues: str = "analyze,export", name: str = "worker") -> Daemon:
        d = Daemon(["worker", "--queues", queues, "--name", f"{name}@%h-{self.port}"],
                   self.env, self.tmp / f"{name}.log")
        self.daemons.append(d)
        wait_for(lambda: "ready" in d.log.read_text(errors="replace") or not d.alive(), 90,
                 f"the {name} to be ready")
        if not d.alive():
            pytest.fail(f"worker exited:\n{d.tail()}")
        return d

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``discus ARGS`` with this configuration; return the finished process."""
        cp = subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=self.env,
                            capture_output=True, text=True, timeout=120)
        if check and cp.returncode != 0:
            pytest.fail(f"discus {' '.join(args)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
        return cp

    def index(self) -> Any:
        from worker.index import StudyIndex

        return StudyIndex.from_url(self.redis_url)

    def logs(self) -> str:
        return "\n\n".join(f"--- {d.log.name} ---\n{d.tail()}" for d in self.daemons)

    def stop(self) -> None:
        for d in self.daemons:  # signal all first: their shutdowns overlap
            if d.alive():
                d.proc.send_signal(signal.SIGTERM)
        for d in self.daemons:
            d.terminate(timeout=10)


@pytest.fixture
def discus(tmp_path: Path, redis_url: str, listener_port: int,
           request: pytest.FixtureRequest) -> Iterator[Callable[..., Discus]]:
    """Factory: ``discus(orthanc=None, **settings)`` -> a :class:`Discus` torn down after the test."""
    made: list[Discus] = []

    def make(orthanc: Orthanc | None = None, **overrides: Any) -> Discus:
        d = Discus(tmp_path, redis_url, orthanc, listener_port, overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(d.logs())
        d.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    # Lets fixtures see whether the test failed, to print the daemons' logs then.
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def storescu(port: int, files: list[Path], aet: str = "MODALITY", called: str = "DISCUS",
             timeout: float = 120, required_only: bool = False) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu over one association (Nagle off).

    ``required_only`` proposes just the files' own SOP classes (``-R``): storescu's
    default list lacks some (Comprehensive 3D SR among them).
    """
    return subprocess.run(
        [need("storescu"), "-aet", aet, "-aec", called, "-nh", *(["-R"] if required_only else []),
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **NODELAY_ENV},
    )
