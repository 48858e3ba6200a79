"""The discus command line, run as the operator runs it (a subprocess) against a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port


def discus(*args: str, config: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("DISCUS_CONFIG", None)
    if config is not None:
        env["DISCUS_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "discus.toml"
    path.write_text(f'redis_url = "{redis_url}"\ndata_dir = "{tmp_path / "var"}"\n'
                    f'[[destinations]]\nname = "nowhere"\nport = {free_port()}\n')
    return path


def test_help_is_fast_and_lists_the_commands() -> None:
    t0 = time.perf_counter()
    cp = discus("--help")
    assert cp.returncode == 0, cp.stderr
    assert time.perf_counter() - t0 < 10
    for command in ("listen", "worker", "dashboard", "status", "reprocess", "deadletter",
                    "demo-study", "send", "doctor", "models", "results"):
        assert command in cp.stdout


def test_bad_arguments_are_refused() -> None:
    cp = discus("demo-study", "--out", "/nonexistent/x", "--modality", "PET")
    assert cp.returncode != 0 and "PET" in cp.stdout + cp.stderr
    cp = discus("worker", "--queues", "gpu")
    assert cp.returncode != 0 and "gpu" in cp.stdout + cp.stderr
    cp = discus("--config", "/nonexistent.toml", "status")
    assert cp.returncode != 0


@pytest.mark.integration
def test_status_reprocess_and_deadletters(config: Path, redis_url: str) -> None:
    from worker.index import StudyIndex

    idx = StudyIndex.from_url(redis_url)
    idx.record_instance("1.2.3", "1.2.3.4", "d", Path("/s/1.2.3"), now=1.0)
    assert idx.claim("1.2.3", quiet=0, now=2.0) == 1
    idx.add_dead_letter("1.2.3", 1, "/o/sr.dcm", "nowhere", "connection refused")

    cp = discus("status", "--json", config=config)
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["queues"] == {"analyze": 0, "export": 0}
    assert data["studies"][0]["study"] == "1.2.3"
    assert data["jobs"][0]["state"] == "export_failed"
    assert data["dead_letters"][0]["reason"] == "connection refused"
    assert "1.2.3" in discus("status", config=config).stdout  # the tables

    cp = discus("reprocess", "1.2.3", config=config)
    assert cp.returncode == 0 and "revision 2" in cp.stdout
    assert idx.job("1.2.3", 2)["task_id"] == "analyze-1.2.3-2"
    assert discus("reprocess", "9.9.9", config=config).returncode == 1

    assert "connection refused" in discus("deadletter", "list", config=config).stdout
    assert discus("deadletter", "replay", "nope", config=config).returncode == 1


@pytest.mark.integration
def test_doctor_reports_an_unreachable_destination(config: Path) -> None:
    cp = discus("doctor", config=config, timeout=120)
    assert cp.returncode == 1
    assert "ok   Redis" in cp.stdout
    assert "FAIL destination nowhere" in cp.stdout


def test_models_lists_every_shipped_package_with_its_provenance() -> None:
    from models.package import SHIPPED_DIR

    cp = discus("models", timeout=180)
    assert cp.returncode == 0, cp.stderr
    assert "architectures:" in cp.stdout
    # the level localizer is an ensemble (a list of weights): it is installed, not "not installed"
    assert "not installed" not in cp.stdout, cp.stdout
    lines = [ln.strip() for ln in cp.stdout.splitlines()]
    for cfg_path in sorted(SHIPPED_DIR.glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        mine = [ln for ln in lines if ln.startswith(f"{cfg['name']} {cfg['version']}:")]
        assert len(mine) == 1, (cfg["name"], cp.stdout)
        kinds = {src["kind"] for src in cfg["provenance"]["training_data"]}
        assert ("[SYNTHETIC ONLY]" in mine[0]) == (kinds == {"synthetic"}), mine[0]
    assert "report_synthetic_models = false" in cp.stdout


def test_worker_parent_and_listener_do_not_import_torch() -> None:
    # CUDA must never be initialised in the process that forks the analysis children.
    code = ("import sys, worker.celery_app, worker.tasks, worker.listener, worker.cli; "
            "print('torch' in sys.modules)")
    cp = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "False"


@pytest.mark.integration
def test_dashboard_requires_basic_auth(config: Path) -> None:
    import base64
    import urllib.error
    import urllib.request

    from tests.conftest import port_open, wait_for

    port = free_port()
    env = {**os.environ, "DISCUS_CONFIG": str(config), "DISCUS_FLOWER_PASSWORD": "s3cret"}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "dashboard", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 60, "Flower")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert refused.value.code == 401
        token = base64.b64encode(b"admin:s3cret").decode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers",
                                     headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(20)


def test_training_commands_are_mounted_when_present() -> None:
    import importlib.util

    if importlib.util.find_spec("training.cli") is None:
        pytest.skip("training.cli is not part of this tree")
    for sub in ("train", "evaluate"):
        cp = discus(sub, "--help", timeout=120)
        assert cp.returncode == 0, cp.stderr
        assert f"discus {sub}" in cp.stdout
