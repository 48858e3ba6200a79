"""The ``discus`` command line: one Typer app for the daemon, its operators and the demo.

Heavy modules (Celery, pynetdicom, torch) are imported inside the commands, so
``discus --help`` stays fast and a missing optional part (training) breaks nothing else.
Every command reads the settings from ``--config`` / ``$DISCUS_CONFIG`` and ``DISCUS_*``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(help="Discus: an AI worker for lumbar spine imaging beside your PACS.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
deadletter_app = typer.Typer(help="Exports that missed their deadline: list and replay.",
                             no_args_is_help=True)
app.add_typer(deadletter_app, name="deadletter")


def _settings(**overrides: Any) -> Any:
    from worker.settings import Settings

    return Settings.load(**{k: v for k, v in overrides.items() if v is not None})


def _index(settings: Any) -> Any:
    from worker.index import StudyIndex

    return StudyIndex.from_url(settings.redis_url)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@app.callback()
def _root(
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="TOML configuration file (else $DISCUS_CONFIG).")] = None,
) -> None:
    if config is not None:
        if not config.is_file():
            raise typer.BadParameter(f"{config} does not exist", param_hint="--config")
        os.environ["DISCUS_CONFIG"] = str(config.resolve())


@app.command()
def listen(
    port: Annotated[Optional[int], typer.Option(help="TCP port (default from settings: 11112).")] = None,
    ae_title: Annotated[Optional[str], typer.Option(help="The listener's AE title.")] = None,
    spool: Annotated[Optional[Path], typer.Option(help="Folder received instances go to.")] = None,
    processes: Annotated[Optional[int], typer.Option(
        help="Listener processes sharing the port (for many concurrent senders).")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Receive studies over DICOM C-STORE and queue quiet ones for analysis (until SIGTERM)."""
    from worker.listener import serve

    _logging(log_level)
    serve(_settings(port=port, ae_title=ae_title, spool_dir=spool, listener_processes=processes))


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: analyze, export.")] = "analyze,export",
    concurrency: Annotated[Optional[int], typer.Option(
        help="Processes; default 1 when analysing (one warm model process per GPU), else 2.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Celery node name.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Start a Celery worker for the given queues.

    Analysis runs in a prefork child: models (and CUDA) are loaded there at process start,
    never in the parent that forks, and the task time limits can stop a stuck child.
    """
    from worker.celery_app import ANALYZE_QUEUE, EXPORT_QUEUE, QUEUES_ENV

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in (ANALYZE_QUEUE, EXPORT_QUEUE)]
    if not wanted or unknown:
        raise typer.BadParameter(f"unknown queues {unknown or wanted}", param_hint="--queues")
    os.environ[QUEUES_ENV] = ",".join(wanted)
    if concurrency is None:
        concurrency = 1 if ANALYZE_QUEUE in wanted else 2
    from worker.celery_app import app as celery

    argv = ["worker", "-Q", ",".join(wanted), "-c", str(concurrency), "--pool", "prefork",
            "-l", log_level, "-E", "--without-gossip", "--without-mingle"]
    if name:
        argv += ["-n", name]
    celery.worker_main(argv)


@app.command()
def dashboard(
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default 5555).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Bind address (default loopback).")] = None,
) -> None:
    """Run Flower, the Celery dashboard, with basic auth from the settings."""
    s = _settings()
    os.execv(sys.executable, [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
        f"--port={port or s.flower_port}", f"--address={address or s.flower_address}",
        f"--basic-auth={s.flower_user}:{s.flower_password}",
    ])


def _age(ts: str | None) -> str:
    if not ts:
        return ""
    secs = time.time() - float(ts)
    return f"{secs:.0f} s ago" if secs < 120 else f"{secs / 60:.0f} min ago"


def _status_data(settings: Any, limit: int) -> dict[str, Any]:
    from worker.celery_app import ANALYZE_QUEUE, EXPORT_QUEUE

    idx = _index(settings)
    return {
        "queues": {q: int(idx.r.llen(q)) for q in (ANALYZE_QUEUE, EXPORT_QUEUE)},
        "studies": idx.studies(limit),
        "jobs": idx.jobs(limit),
        "dead_letters": [d.__dict__ for d in idx.dead_letters()],
    }


@app.command()
def status(
    limit: Annotated[int, typer.Option(help="How many studies and jobs to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show queue lengths, recent studies and jobs, and dead letters."""
    data = _status_data(_settings(), limit)
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    q = Table(title="Queues")
    q.add_column("queue")
    q.add_column("waiting", justify="right")
    for name, n in data["queues"].items():
        q.add_row(name, str(n))
    console.print(q)
    st = Table(title="Studies")
    for col in ("study", "state", "instances", "revision", "last seen", "reason"):
        st.add_column(col, overflow="fold")
    for s in data["studies"]:
        st.add_row(s["study"], s.get("state", ""), s.get("instances", ""), s.get("revision", ""),
                   _age(s.get("last_seen")), s.get("reason") or s.get("export_error", ""))
    console.print(st)
    jt = Table(title="Jobs")
    for col in ("study", "rev", "state", "attempts", "result", "exports", "reason"):
        jt.add_column(col, overflow="fold")
    for j in data["jobs"]:
        jt.add_row(j.get("study", ""), j.get("revision", ""), j.get("state", ""),
                   j.get("attempts", ""), j.get("result", ""),
                   f"{j.get('exports_done', 0)}/{j.get('exports_expected', '?')}",
                   j.get("reason") or j.get("export_error", ""))
    console.print(jt)
    dt = Table(title="Dead letters")
    for col in ("id", "study", "rev", "destination", "file", "reason"):
        dt.add_column(col, overflow="fold")
    for d in data["dead_letters"]:
        dt.add_row(d["id"], d["study_uid"], str(d["revision"]), d["destination"],
                   Path(d["path"]).name, d["reason"])
    console.print(dt)


@app.command()
def reprocess(study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")]) -> None:
    """Analyse a known study again as a new revision (its SR supersedes the previous one)."""
    from worker.errors import JobNotFoundError
    from worker.listener import send_analysis

    s = _settings()
    idx = _index(s)
    try:
        idx.study(study_uid)
    except JobNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    revision = idx.claim(study_uid, s.quiet_period, force=True)
    idx.mark_enqueued(study_uid, revision, send_analysis(study_uid, revision))
    typer.echo(f"queued {study_uid} revision {revision}")


@deadletter_app.command("list")
def deadletter_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List parked exports with their reasons."""
    items = _index(_settings()).dead_letters()
    if as_json:
        typer.echo(json.dumps([d.__dict__ for d in items], indent=2))
        return
    for d in items:
        typer.echo(f"{d.id}  {d.study_uid} r{d.revision}  {d.destination}  "
                   f"{Path(d.path).name}  {d.reason}")
    if not items:
        typer.echo("no dead letters")


@deadletter_app.command("replay")
def deadletter_replay(
    ids: Annotated[Optional[list[str]], typer.Argument(help="Entry ids; none: all of them.")] = None,
) -> None:
    """Queue parked exports again, each with a fresh deadline."""
    from worker.errors import DeadLetterError
    from worker.tasks import export_object

    s = _settings()
    idx = _index(s)
    chosen = ids or [d.id for d in idx.dead_letters()]
    failed = False
    for entry in chosen:
        try:
            d = idx.take_dead_letter(entry)
        except DeadLetterError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        export_object.apply_async(
            args=[d.study_uid, d.revision, d.path, d.destination, time.time() + s.export_deadline])
        typer.echo(f"replaying {d.id}: {Path(d.path).name} to {d.destination}")
    if failed:
        raise typer.Exit(1)


@app.command("demo-study")
def demo_study(
    out: Annotated[Path, typer.Option(help="Folder to write the study into.")],
    modality: Annotated[str, typer.Option(help="MR, CT or DX.")] = "MR",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same study).")] = 0,
) -> None:
    """Write a synthetic lumbar spine study with its ground truth beside it."""
    from dicom_io.phantom import write_demo_study

    modality = modality.upper()
    if modality not in ("MR", "CT", "DX"):
        raise typer.BadParameter(f"{modality!r} is not one of MR, CT, DX", param_hint="--modality")
    truth = write_demo_study(out, modality, seed)
    typer.echo(str(truth))


def _dicom_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() != ".json")
        elif p.is_file():
            files.append(p)
        else:
            raise typer.BadParameter(f"{p} does not exist", param_hint="PATH")
    return files


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursively).")],
    host: Annotated[str, typer.Option(help="Destination host.")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(help="Destination port (default: our listener's).")] = None,
    called: Annotated[Optional[str], typer.Option(help="Called AE title (default: ours).")] = None,
    calling: Annotated[str, typer.Option(help="Calling AE title.")] = "DISCUS-SCU",
) -> None:
    """Send DICOM files by C-STORE over one association (a modality, for tests and demos)."""
    from dicom_io.scu import send_files

    s = _settings()
    files = _dicom_files(paths)
    results = send_files(files, host, port or s.port, called or s.ae_title, calling,
                         network_timeout=s.network_timeout)
    failed = [r for r in results if not r.ok]
    for r in failed:
        typer.echo(f"{r.path}: {r.error}", err=True)
    typer.echo(f"sent {len(results) - len(failed)} of {len(results)} files")
    if failed:
        raise typer.Exit(1)


SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _fetch_results(url: str, study_uid: str) -> tuple[list[dict[str, Any]], Any]:
    """Instances of the study in the PACS (QIDO-RS), and its newest SR (WADO-RS) or None."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url)
    # The fields to sort SRs by date and show descriptions are not in every PACS's defaults.
    found = client.search_for_instances(
        study_instance_uid=study_uid,
        fields=["SeriesDescription", "Modality", "SOPClassUID", "SeriesInstanceUID",
                "ContentDate", "ContentTime"])
    rows = []
    for item in found:
        def val(tag: str) -> str:
            v = item.get(tag, {}).get("Value", [""])
            return str(v[0]) if v else ""
        rows.append({"series": val("0020000E"), "sop_class": val("00080016"),
                     "sop_instance": val("00080018"), "modality": val("00080060"),
                     "description": val("0008103E"), "when": val("00080023") + val("00080033")})
    srs = sorted((r for r in rows if r["sop_class"].startswith(SR_CLASS_PREFIX)
                  and r["modality"] == "SR"), key=lambda r: r["when"])
    sr = None
    if srs:
        sr = client.retrieve_instance(study_uid, srs[-1]["series"], srs[-1]["sop_instance"])
    return rows, sr


def _results_url(url: str | None) -> tuple[str, dict[str, str] | None]:
    """The PACS to read results from: ``--url``, else ``results_url``, else the first dicomweb destination."""
    s = _settings()
    if url:
        return url, None
    if s.results_url:
        return s.results_url, None
    for d in s.destinations:
        if d.kind == "dicomweb" and d.url:
            return d.url, ({"username": d.username, "password": d.password or ""} if d.username else None)
    raise typer.BadParameter("no PACS to read from: give --url, or set results_url (or a dicomweb destination) "
                             "in the configuration", param_hint="--url")


def _study_by_accession(url: str, accession: str, auth: dict[str, str] | None) -> str:
    """The Study Instance UID of an accession number (QIDO-RS); refuses none or several."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url, **(_session(auth) if auth else {}))
    found = client.search_for_studies(search_filters={"AccessionNumber": accession})
    uids = sorted({str(f.get("0020000D", {}).get("Value", [""])[0]) for f in found} - {""})
    if len(uids) != 1:
        raise typer.BadParameter(f"accession number {accession!r}: {len(uids)} studies in the PACS "
                                 f"({', '.join(uids) or 'none'})", param_hint="--accession")
    return uids[0]


def _session(auth: dict[str, str]) -> dict[str, Any]:
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth

    return {"session": create_session_from_auth(HTTPBasicAuth(auth["username"], auth["password"]))}


@app.command()
def results(
    study: Annotated[str, typer.Argument(help="Study Instance UID (or, with --accession, an accession number).")],
    url: Annotated[str | None, typer.Option(help="DICOMweb base URL of the PACS (default: results_url, "
                                                  "else the first dicomweb destination).")] = None,
    accession: Annotated[bool, typer.Option("--accession", help="STUDY is an accession number.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the SR to arrive.")] = 0.0,
) -> None:
    """Show what Discus sent back into the PACS for a study: objects, the SR's findings, revision and notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    base, auth = _results_url(url)
    study_uid = _study_by_accession(base, study, auth) if accession else study
    if accession:
        console.print(f"accession {study}: study {study_uid}")
    url = base
    deadline = time.monotonic() + wait
    while True:
        try:
            rows, sr = _fetch_results(url, study_uid)
        except Exception as exc:  # PACS not reachable yet: keep waiting until the deadline
            rows, sr, error = [], None, exc
        else:
            error = None
        if sr is not None or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if sr is None:
        why = f" ({type(error).__name__}: {error})" if error else ""
        console.print(f"[red]no SR for study {study_uid} at {url}{why}[/red]")
        raise typer.Exit(1)
    ours = [r for r in rows if r["modality"] in ("SR", "OT") or r["sop_class"].startswith(SR_CLASS_PREFIX)
            or r["sop_class"].startswith("1.2.840.10008.5.1.4.1.1.7")]
    objects = Table(title=f"Objects in the PACS from Discus ({len(ours)})")
    for col in ("modality", "series description", "SOP class", "SOP instance"):
        objects.add_column(col, overflow="fold")
    for r in ours:
        objects.add_row(r["modality"], r["description"], r["sop_class"], r["sop_instance"])
    console.print(objects)
    from dicom_io.sr import read_sr

    findings = read_sr(sr)
    title = getattr(sr, "ContentLabel", "") or "SR"
    table = Table(title=f"Findings in the SR ({title}, {len(findings)} entries)")
    for col in ("level", "condition", "side", "grade", "probability", "model"):
        table.add_column(col)
    for f in findings:
        prob = f.get("probability")
        table.add_row(f["level"], f["condition"], f.get("laterality") or "", f["grade"],
                      f"{prob:.2f}" if isinstance(prob, (int, float)) else "",
                      f"{f.get('model') or ''} {f.get('model_version') or ''}".strip())
    console.print(table)
    from dicom_io.sr import read_notes, read_status

    outcome, reason = read_status(sr)
    console.print(f"SR revision {getattr(sr, 'InstanceNumber', '?')} ({sr.SOPInstanceUID}): {outcome}"
                  + (f"; {reason}" if reason else ""), markup=False)
    for note in read_notes(sr):
        console.print(f"  {note}", markup=False, soft_wrap=True)
    if not findings:
        console.print("The SR reports no findings; its text says why (analysis not performed, "
                      "or no model package installed for the analyses).")
    s = _settings()
    latest = sorted((s.outbox / study_uid).glob("*/result.json"), key=lambda p: int(p.parent.name))
    if latest:
        from dicom_io.results import StudyResult

        res = StudyResult.from_json(latest[-1].read_text())
        console.print(f"status: {res.status.value}" + (f" ({res.reason})" if res.reason else ""))
        for analysis, why in sorted(res.not_run.items()):
            console.print(f"  not run: {analysis}: {why}")


@app.command()
def doctor() -> None:
    """Check the configuration, Redis, each destination (C-ECHO), tools and model packages."""
    from rich.console import Console

    console = Console()
    problems = 0

    def report(ok: bool, what: str, detail: str = "") -> None:
        nonlocal problems
        problems += not ok
        mark = "[green]ok[/green]  " if ok else "[red]FAIL[/red]"
        console.print(f"{mark} {what}" + (f": {detail}" if detail else ""))

    try:
        s = _settings()
    except Exception as exc:
        report(False, "configuration", str(exc))
        raise typer.Exit(1) from None
    report(True, "configuration", os.environ.get("DISCUS_CONFIG", "defaults and DISCUS_* env"))
    try:
        _index(s).r.ping()
        report(True, "Redis", s.redis_url)
    except Exception as exc:
        report(False, "Redis", f"{s.redis_url}: {exc}")
    for folder in (s.spool, s.outbox):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".doctor"
            probe.write_bytes(b"")
            probe.unlink()
            report(True, "writable", str(folder))
        except OSError as exc:
            report(False, "writable", f"{folder}: {exc}")
    from worker.export import echo_destination

    if not s.destinations:
        report(False, "destinations", "none configured: results would go nowhere")
    for d in s.destinations:
        where = d.url if d.kind == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}"
        problem = echo_destination(d, s)
        report(problem is None, f"destination {d.name} ({d.kind})", problem or where)
    for tool in ("storescu", "echoscu", "dciodvfy", "dsrdump"):
        found = shutil.which(tool)
        report(found is not None, f"tool {tool}", found or "not installed (apt: dcmtk, dicom3tools)")
    try:
        from models.package import installed_packages
        from worker.model_packages import TASKS

        pk = installed_packages([str(p) for p in s.model_dirs] or None)
        missing = [t for t in TASKS if t not in {c.task for c in pk}]
        report(True, "model packages", (", ".join(f"{c.task}:{c.name}" for c in pk) or "none")
               + (f"; not installed (reported as not run): {', '.join(missing)}" if missing else ""))
    except Exception as exc:
        report(False, "model packages", f"{type(exc).__name__}: {exc}")
    if problems:
        raise typer.Exit(1)


@app.command()
def models() -> None:
    """List registered architectures and installed model packages."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = _settings()
    try:
        from models.registry import list_models

        console.print("architectures: " + ", ".join(list_models()))
    except ImportError as exc:
        console.print(f"architectures: unavailable ({exc})")
    try:
        from models.package import installed_packages, package_summary
    except ImportError as exc:
        console.print(f"packages: unavailable ({exc})")
        return
    found = installed_packages([str(p) for p in s.model_dirs] or None)
    present = {c.task for c in found}
    table = Table(title="Installed model packages")
    cols = ("name", "task", "architecture", "version", "accuracy", "sha256")
    for c in cols:
        table.add_column(c)
    for cfg in found:
        summary = package_summary(cfg)
        table.add_row(*(summary[c] for c in cols))
    console.print(table)
    console.print("provenance (report_synthetic_models = "
                  f"{'true: synthetic-only packages report' if s.report_synthetic_models else 'false: synthetic-only packages are withheld'}):")
    for cfg in found:
        console.print(f"  {cfg.name} {cfg.version}: {package_summary(cfg)['provenance']}", soft_wrap=True,
                      markup=False)
    from worker.model_packages import TASKS

    missing = [t for t in TASKS if t not in present]
    if missing:
        console.print("not installed: " + ", ".join(missing)
                      + " (these analyses are reported as not run)")


def _mount_training(argv: list[str]) -> None:
    """Add ``train`` and ``evaluate`` from training.cli when asked for and present.

    Importing training pulls in torch, so other commands (and ``--help``) only mention them.
    """
    import importlib.util

    try:
        present = importlib.util.find_spec("training.cli") is not None
    except ImportError:
        present = False
    if not present:
        return
    first = next((a for a in argv if not a.startswith("-")), "")
    if first not in ("train", "evaluate"):
        app.info.epilog = "Also: train, evaluate (model training; see 'discus train --help')."
        return
    try:
        from training.cli import evaluate_app, train_app
    except ImportError as exc:
        typer.echo(f"training is not usable here: {exc}", err=True)
        return
    app.add_typer(train_app, name="train")
    app.add_typer(evaluate_app, name="evaluate")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``discus`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    _mount_training(argv)
    app(args=argv, prog_name="discus")


if __name__ == "__main__":
    main()
