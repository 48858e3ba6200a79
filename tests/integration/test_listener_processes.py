"""Several listener processes share one port; SIGTERM stops them all."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import port_open, storescu, wait_for
from tests.integration.studies import demo_study, rewrite

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_listener_processes_share_the_port_and_stop_together(tmp_path: Path, discus) -> None:
    d = discus(listener_processes=3, quiet_period=3600.0)  # nothing analysed: ingest only
    listener = d.start_listener()
    wait_for(lambda: len(set(re.findall(r"\(pid (\d+)\)", listener.log.read_text()))) == 3, 60,
             "three listener processes on the port")
    uid_a, files = demo_study(tmp_path / "a", "MR", seed=51)
    uid_b, files_b = rewrite(files, tmp_path / "b", lambda ds: None, "b")
    uid_c, files_c = rewrite(files, tmp_path / "c", lambda ds: None, "c")
    senders = [subprocess.Popen(["storescu", "-aec", "DISCUS", "127.0.0.1", str(d.port),
                                 *map(str, batch)], env=d.env)
               for batch in (files, files_b, files_c)]
    assert [s.wait(120) for s in senders] == [0, 0, 0]
    idx = d.index()
    for uid, batch in ((uid_a, files), (uid_b, files_b), (uid_c, files_c)):
        assert int(idx.study(uid)["instances"]) == len(batch)
        assert len(list((d.spool / uid).rglob("*.dcm"))) == len(batch)
    pids = subprocess.run(["pgrep", "-f", "multiprocessing.spawn"], capture_output=True,
                          text=True).stdout.split()
    assert listener.terminate() == 0
    wait_for(lambda: not port_open(d.port), 30, "every listener process to close the port")
    assert storescu(d.port, files[:1]).returncode != 0
    still = [p for p in pids if Path(f"/proc/{p}").exists()
             and str(d.config) in Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace")]
    assert still == []
