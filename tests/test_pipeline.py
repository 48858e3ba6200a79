"""The study-level pipeline on synthetic DICOM studies written by the phantom (no daemon).

Uses the model packages installed in ``models/packages``: an analysis whose
package is missing must appear in ``not_run`` with its reason and produce no
finding; an installed one must produce its findings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.results import DISCS, ConditionValues, StatusValues, StudyResult
from tests.phantom_settings import PHANTOMS
from worker.model_packages import ModelPackages
from worker.pipeline import OutputStream, analyze_study, encode_outputs

phantom = pytest.importorskip("dicom_io.phantom", reason="the phantom writer is not installed")

from models.crops import CROP_SPECS  # noqa: E402  (after the phantom writer is known to be there)

MR_TASKS = {
    "mr_disc": ConditionValues.DISC,
    "mr_canal": ConditionValues.SPINAL_CANAL_STENOSIS,
    "mr_foramen": ConditionValues.NEURAL_FORAMINAL_NARROWING,
    "mr_subarticular": ConditionValues.SUBARTICULAR_STENOSIS,
}


TASK_OF_CONDITION = {c: t for t, c in MR_TASKS.items()}


@pytest.fixture(scope="module")
def packages() -> ModelPackages:
    return ModelPackages.shared()


@pytest.fixture(scope="module")
def mr_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mr")
    findings = {"L4-L5": phantom.LevelFindings(disc="herniation", disc_side="L", canal="severe")}
    gt = phantom.write_demo_study(out, "MR", seed=3, findings=findings)
    return out, json.loads(Path(gt).read_text())


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.dcm"))]


def _rewrite(src: Path, dst: Path, edit, keep=lambda ds: True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(_files(src)):
        ds = pydicom.dcmread(f)
        if not keep(ds):
            continue
        edit(ds)
        ds.save_as(dst / f"{i:05d}.dcm", enforce_file_format=True)
    return dst


def test_mr_study(mr_study: tuple[Path, dict], packages: ModelPackages) -> None:
    folder, gt = mr_study
    res = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.ANALYSED, res.reason
    assert res.modality == "MR"
    roles = {s.role.value for s in res.series}
    assert {"SAG_T2", "SAG_T1", "AX_T2"} <= roles
    assert all(s.reason for s in res.series)
    assert {"load", "select", "volumes", "total"} <= set(res.timings)
    if packages.get("levels") is None:
        assert "no model package" in res.not_run["levels"] or "failed" in res.not_run["levels"]
        assert res.findings == [] and res.levels == []
        return
    # Localization accuracy is the localizer's (its tests, the e2e tests); here: the join.
    sag_t2 = next(s.series_instance_uid for s in res.series if s.role.value == "SAG_T2")
    assert res.levels or any("found no level" in w for w in res.warnings), res.warnings
    assert all(lv.image.series_instance_uid == sag_t2 for lv in res.levels)
    found = {lv.level for lv in res.levels}
    graded = {f.level for f in res.findings}
    assert graded <= found & {"L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"}
    for task, condition in MR_TASKS.items():
        mine = [f for f in res.findings if f.condition is condition]
        if packages.get(task) is None:
            assert task in res.not_run and not mine
            continue
        assert mine, (task, res.not_run.get(task), res.warnings)
        for f in mine:
            assert f.level in DISCS and abs(sum(f.probabilities.values()) - 1.0) < 1e-3
            assert (f.heatmap is not None) == (f.severity >= 1)
            if f.heatmap is not None:
                assert f.heatmap.shape == (
                    pydicom.dcmread(_sop_path(folder, f.image.sop_instance_uid), stop_before_pixels=True).Rows,
                    pydicom.dcmread(_sop_path(folder, f.image.sop_instance_uid), stop_before_pixels=True).Columns,
                )
    # The JSON round trip the worker stores keeps everything but the heatmaps.
    back = StudyResult.from_json(res.to_json())
    assert len(back.findings) == len(res.findings) and back.not_run == res.not_run


def _sop_path(folder: Path, uid: str) -> Path:
    for f in _files(folder):
        if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == uid:
            return f
    raise AssertionError(f"no file for {uid}")


def test_missing_packages_are_reported_not_invented(mr_study: tuple[Path, dict], tmp_path: Path) -> None:
    folder, _ = mr_study
    empty = ModelPackages([tmp_path])
    res = analyze_study(folder, 1, packages=empty, settings=PHANTOMS)
    assert res.status is StatusValues.ANALYSED
    assert res.findings == [] and res.levels == []
    assert res.not_run["levels"] == f"no model package installed in {tmp_path}"


def test_encode_outputs_atomic_and_deterministic(mr_study: tuple[Path, dict], packages: ModelPackages,
                                                 tmp_path: Path) -> None:
    folder, _ = mr_study
    res = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    first = encode_outputs(res, folder, tmp_path / "a")
    again = encode_outputs(res, folder, tmp_path / "b")
    assert first and [p.name for p in first] == [p.name for p in again]
    assert not list((tmp_path / "a").glob(".tmp-*"))
    sr = pydicom.dcmread(first[0])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == res.study_instance_uid
    assert f"{sr.SOPInstanceUID}.dcm" == first[0].name
    heat = [f for f in res.findings if f.heatmap is not None]
    assert len(first) >= 1 + len(heat)
    assert len(OutputStream(res, folder, tmp_path / "c")) == len(first)  # known before encoding


def test_head_mr_is_not_performed(mr_study: tuple[Path, dict], tmp_path: Path, packages: ModelPackages) -> None:
    def head(ds):
        ds.BodyPartExamined = "HEAD"
        ds.StudyDescription = "MR BRAIN"
        ds.SeriesDescription = "AX T2 BRAIN"

    folder = _rewrite(mr_study[0], tmp_path / "head", head)
    res = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.NOT_PERFORMED and res.reason
    assert res.findings == []
    files = encode_outputs(res, folder, tmp_path / "out")
    assert len(files) == 1 and pydicom.dcmread(files[0]).Modality == "SR"
    assert encode_outputs(res, folder, tmp_path / "none", not_performed_sr=False) == []


def test_two_patients_under_one_study_uid_are_not_analysed(mr_study: tuple[Path, dict], tmp_path: Path,
                                                          packages: ModelPackages) -> None:
    def other_patient(ds):
        if "T1" in str(ds.SeriesDescription).upper():
            ds.PatientID, ds.PatientName = "OTHER-0001", "Other^Patient"

    folder = _rewrite(mr_study[0], tmp_path / "mixed", other_patient)
    res = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.NOT_PERFORMED and res.findings == []
    assert "disagree on patient identity" in res.reason
    assert "Other" not in res.reason and "OTHER-0001" not in res.reason  # the reason names no identity
    # one patient's study, rewritten the same way with no change, is analysed
    same = _rewrite(mr_study[0], tmp_path / "same", lambda ds: None)
    assert analyze_study(same, 1, packages=packages, settings=PHANTOMS).status is StatusValues.ANALYSED


def test_localizer_only_and_garbage_are_not_performed(mr_study: tuple[Path, dict], tmp_path: Path,
                                                      packages: ModelPackages) -> None:
    def localizer(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesDescription = "LOCALIZER"

    first_series = _files(mr_study[0])[0].parent
    folder = _rewrite(first_series, tmp_path / "loc", localizer)
    res = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.NOT_PERFORMED and res.reason

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"not dicom at all" * 20)
    res = analyze_study(junk, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.NOT_PERFORMED and res.reason
    res = analyze_study(tmp_path / "missing-folder", 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.NOT_PERFORMED and res.reason


def test_no_geometry_series_is_skipped_with_warning(mr_study: tuple[Path, dict], tmp_path: Path,
                                                    packages: ModelPackages) -> None:
    sag_t1 = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in _files(mr_study[0])
              if "T1" in str(pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription)}

    def strip(ds):
        if ds.SeriesInstanceUID in sag_t1:
            for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                if kw in ds:
                    delattr(ds, kw)

    folder = _rewrite(mr_study[0], tmp_path / "nogeo", strip)
    res = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.ANALYSED, res.reason
    # Either the rules set it aside or its volume failed; never a crash, and it is said.
    used = {s.series_instance_uid: s for s in res.series}
    t1 = next(iter(sag_t1))
    assert used[t1].role.value == "OTHER" or any(t1 in w for w in res.warnings)


@pytest.mark.parametrize("modality", ["CT", "DX"])
def test_ct_and_xray_studies(modality: str, tmp_path: Path, packages: ModelPackages) -> None:
    gt = json.loads(Path(phantom.write_demo_study(tmp_path, modality, seed=5)).read_text())
    res = analyze_study(tmp_path, 1, packages=packages, settings=PHANTOMS)
    assert res.status is StatusValues.ANALYSED, res.reason
    tasks = ("ct_disc",) if modality == "CT" else ("xray",)
    for task in tasks:
        if packages.get(task) is None or (modality == "CT" and packages.get("levels") is None):
            assert task in res.not_run or "levels" in res.not_run
            continue
        assert res.findings, (res.not_run, res.warnings)
    if modality == "DX" and packages.get("xray") is not None:
        assert {f.level for f in res.findings} == {"lumbar spine"}
        assert all(f.grade in ("normal", "scoliosis", "spondylolisthesis") for f in res.findings)
        assert len(res.findings) == len({f.image.sop_instance_uid for f in res.findings}) >= 1
    assert gt["synthetic"] is True


def test_mr_geometry_on_dicom_with_oracle_levels(mr_study: tuple[Path, dict], tmp_path: Path) -> None:
    """Crops and heatmaps on real DICOM geometry, with the phantom's level points as the localizer.

    Independent of the shipped models: the doubles grade every crop "moderate"
    (so every finding gets a heatmap), which checks that each finding refers to
    an image through its disc and that the SR and SC encoders accept the result.
    """
    from types import SimpleNamespace

    from dicom_io.headers import load_study
    from dicom_io.volumes import load_volumes

    folder, gt = mr_study
    discs = {k: v for k, v in gt["levels"].items() if k in ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")}

    class Oracle:
        config = {"name": "oracle", "version": "test", "task": "levels", "sha256": "a" * 64}

        def __call__(self, array, affine):
            pts = [SimpleNamespace(name=k, point_mm=tuple(v), voxel=(0, 0, 0), confidence=1.0)
                   for k, v in discs.items()]
            return SimpleNamespace(points=pts, warnings=[], reason=None)

    class Middle:
        def __init__(self, task, classes):
            self.config = SimpleNamespace(name=f"mid-{task}", version="test", task=task, sha256="b" * 64,
                                          class_names=classes, input_size=(32, 32), preprocessing={})
            self.sizes = []

        def predict(self, crops):
            self.sizes.append(crops.shape)
            p = np.full((len(crops), 3), 0.2)
            p[:, 1] = 0.6
            return p

        def explain(self, crops, targets):
            h = np.zeros(crops.shape, np.float32)
            h[:, 16, 16] = 1.0  # the crop centre: the disc point (moved by the spec's offsets)
            return h

    sten = ["normal_mild", "moderate", "severe"]
    objs = {"levels": Oracle(), "mr_canal": Middle("mr_canal", sten), "mr_foramen": Middle("mr_foramen", sten),
            "mr_subarticular": Middle("mr_subarticular", sten),
            "mr_disc": Middle("mr_disc", ["normal", "bulging", "herniation"])}
    res = analyze_study(folder, 1, packages=ModelPackages.from_loaded(objs), settings=PHANTOMS)
    # every analysis provided ran; the sagittal disc grader and the segmenter were not provided here
    assert res.status is StatusValues.ANALYSED and res.not_run == {
        "mr_disc_grading": "not provided", "spine_segmentation": "not provided"}, (res.not_run, res.warnings)
    assert len(res.findings) == 5 * 6
    study = load_study(folder)
    vols = {}
    for s in study.series:
        for v in load_volumes(s):
            for k, uid in enumerate(v.sop_instance_uids):
                vols[uid] = (v, k)
    for f in res.findings:
        v, k = vols[f.image.sop_instance_uid]
        assert f.heatmap is not None and f.heatmap.shape == v.array.shape[1:]
        peak = v.voxel_to_patient([f.image.column, f.image.row, k])[0]
        spec = CROP_SPECS[TASK_OF_CONDITION[f.condition]]
        side = {None: 0.0, "L": 1.0, "R": -1.0}[f.laterality.value if f.laterality else None]
        expected = np.array(discs[f.level]) + [side * spec.lateral_mm, spec.posterior_mm, 0.0]
        d = peak - expected
        # Across the images: at most half the slice spacing (4.4 mm sagittal); within them: the
        # heat is put half a crop pixel (1 mm) off the centre and read back on the image's pixels.
        assert np.linalg.norm(d) < 3.5, (f.condition, f.level, f.laterality, d)
        if spec.plane == "sagittal":
            assert abs(d[0]) < 2.3 and np.linalg.norm(d[1:]) < 2.2, (f.condition, f.level, d)
    files = encode_outputs(res, folder, tmp_path / "out")
    assert len(files) == 1 + len(res.findings) + 1  # SR, one overlay per finding, the key image


def test_mr_with_real_predictors_untrained(mr_study: tuple[Path, dict]) -> None:
    """The pipeline drives the real Predictor (preprocessing, batching, Grad-CAM) end to end.

    Random-weight networks: only shapes, ranges and the heatmap mapping are checked,
    never grades.
    """
    import torch

    from models.config import ModelConfig
    from models.predictor import Predictor
    from models.registry import create_model

    torch.manual_seed(0)
    folder, gt = mr_study
    discs = {k: v for k, v in gt["levels"].items() if k in ("L3-L4", "L4-L5")}

    class Oracle:
        config = {"name": "oracle", "version": "test", "task": "levels", "sha256": "a" * 64}

        def __call__(self, array, affine):
            from types import SimpleNamespace

            pts = [SimpleNamespace(name=k, point_mm=tuple(v), voxel=(0, 0, 0), confidence=1.0)
                   for k, v in discs.items()]
            return SimpleNamespace(points=pts, warnings=[], reason=None)

    def predictor(task: str, classes: list[str]) -> Predictor:
        cfg = ModelConfig(name=f"untrained-{task}", architecture="resnet18", task=task, version="0",
                          input_size=(64, 64), in_chans=1, class_names=classes,
                          preprocessing={"mode": "percentile"}, sha256="c" * 64)
        net = create_model("resnet18", small=True, num_classes=len(classes), in_chans=1)
        return Predictor(net, cfg, device="cpu")

    sten = ["normal_mild", "moderate", "severe"]
    objs = {"levels": Oracle(), "mr_canal": predictor("mr_canal", sten),
            "mr_disc": predictor("mr_disc", ["normal", "bulging", "herniation"])}

    class Everything:  # Grad-CAM for every finding, whatever the grade
        report_synthetic_models = True
        heatmap_min_severity = 0

    res = analyze_study(folder, 1, packages=ModelPackages.from_loaded(objs), settings=Everything())
    assert res.status is StatusValues.ANALYSED
    assert {(f.condition, f.level) for f in res.findings} == {
        (c, lv) for c in (ConditionValues.DISC, ConditionValues.SPINAL_CANAL_STENOSIS) for lv in discs
    }
    for f in res.findings:
        assert abs(sum(f.probabilities.values()) - 1.0) < 1e-4
        assert f.heatmap is not None and f.heatmap.dtype == np.float32
        assert 0.0 <= f.heatmap.min() and f.heatmap.max() <= 1.0
    assert set(res.not_run) == {"mr_foramen", "mr_subarticular", "mr_disc_grading", "spine_segmentation"}
    assert res.timings["explain"] > 0 and res.timings["classify"] > 0


def test_default_settings_withhold_phantom_trained_analyses(mr_study: tuple[Path, dict],
                                                            packages: ModelPackages) -> None:
    """A site's default: no finding from a package that never saw a patient, and the result says why."""
    from worker.analysis import SYNTHETIC_ONLY_REASON

    folder, _ = mr_study
    res = analyze_study(folder, 1, packages=packages)
    assert res.status is StatusValues.ANALYSED, res.reason
    synthetic = [t for t in MR_TASKS if packages.get(t) is not None and packages.synthetic_only(t)]
    assert synthetic, "the shipped MR classifiers are phantom-trained; this test needs one"
    for task in synthetic:
        assert res.not_run[task] == SYNTHETIC_ONLY_REASON
        assert not [f for f in res.findings if f.condition is MR_TASKS[task]]
    assert {m.task for m in res.models}.isdisjoint(synthetic)
    # the level localizer learned from patients: it still reports
    if packages.get("levels") is not None:
        assert not packages.synthetic_only("levels") and "levels" not in res.not_run
