"""MR / CT / X-ray analyses on synthetic volumes with test-double models.

The doubles stand in for trained packages so that these tests check what the
pipeline itself does: which image each crop comes from, sides, tolerances, the
inverse map of heatmaps to source pixels, warnings and ``not_run``. They grade a
crop "abnormal" when it holds a bright lesion and explain with the crop itself,
so a heatmap peak must land on the lesion in the source image.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dicom_io.results import ConditionValues, StudyResult
from dicom_io.volume import Volume
from worker.analysis import AnalysisOptions, Run
from worker.analysis_ct import analyze_ct
from worker.analysis_mr import analyze_mr
from worker.analysis_xray import analyze_xray
from worker.model_packages import ModelPackages

DISC_Z = {"L1-L2": 80.0, "L2-L3": 45.0, "L3-L4": 10.0, "L4-L5": -25.0, "L5-S1": -60.0}
LESION = 1000.0


class FakePredictor:
    """Class 2 when the crop holds a lesion-bright pixel, else class 0; Grad-CAM = the crop."""

    def __init__(self, task: str, class_names: list[str], crop_px: int = 48, net_px: int = 32) -> None:
        self.config = SimpleNamespace(
            name=f"fake-{task}", version="0.0-test", task=task, sha256="0" * 64,
            class_names=class_names, input_size=(net_px, net_px), preprocessing={"crop_px": crop_px},
        )
        self.net_px = net_px
        self.seen: list[np.ndarray] = []

    def predict(self, crops: np.ndarray) -> np.ndarray:
        assert crops.ndim == 3 and crops.dtype == np.float32
        self.seen.append(crops)
        hot = crops.reshape(len(crops), -1).max(axis=1) > LESION / 2
        probs = np.full((len(crops), len(self.config.class_names)), 0.1)
        probs[np.arange(len(crops)), np.where(hot, len(self.config.class_names) - 1, 0)] = 0.8
        return probs / probs.sum(axis=1, keepdims=True)

    def explain(self, crops: np.ndarray, targets: list[int]) -> np.ndarray:
        assert len(crops) == len(targets)
        from worker.analysis import resize

        return np.stack([resize(c, (self.net_px, self.net_px)) for c in crops])


class FakeLocalizer:
    def __init__(self, points: dict[str, tuple[float, float, float]], confidence: dict[str, float] | None = None):
        self.points = points
        self.confidence = confidence or {}
        self.config = {"name": "fake-levels", "version": "0.0-test", "task": "levels", "sha256": "1" * 64}
        self.calls: list[tuple[tuple[int, ...], np.ndarray]] = []

    def __call__(self, array: np.ndarray, affine: np.ndarray) -> SimpleNamespace:
        self.calls.append((array.shape, affine))
        inv = np.linalg.inv(affine)
        pts = [
            SimpleNamespace(
                name=n, point_mm=p, voxel=tuple((inv[:3, :3] @ np.asarray(p) + inv[:3, 3]).tolist()),
                confidence=self.confidence.get(n, 0.9),
            )
            for n, p in self.points.items()
        ]
        return SimpleNamespace(points=pts, warnings=[], reason=None if pts else "nothing")


def _volume(rdir, cdir, spacing: float, n: int, shape: tuple[int, int], centre: np.ndarray, px: float = 1.0,
            uid: str = "1.2.9") -> Volume:
    rdir, cdir = np.asarray(rdir, float), np.asarray(cdir, float)
    normal = np.cross(rdir, cdir)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = rdir * px, cdir * px, normal * spacing
    mid = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2, (n - 1) / 2])
    aff[:3, 3] = centre - aff[:3, :3] @ mid
    arr = np.random.default_rng(0).normal(100.0, 5.0, (n, *shape)).astype(np.float32)
    return Volume(arr, aff, [f"{uid}.{k}" for k in range(n)], series_instance_uid=uid,
                  study_instance_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.4")


def _paint(vol: Volume, point_mm, radius_mm: float = 3.0) -> None:
    """Put a bright ball of lesion intensity at a patient point."""
    s, r, c = np.mgrid[0 : vol.array.shape[0], 0 : vol.array.shape[1], 0 : vol.array.shape[2]]
    pts = vol.voxel_to_patient(np.stack([c.ravel(), r.ravel(), s.ravel()], 1))
    d = np.linalg.norm(pts - np.asarray(point_mm, float), axis=1).reshape(vol.array.shape)
    vol.array[d <= radius_mm] = LESION


def _packages(**extra) -> tuple[ModelPackages, dict]:
    stenosis = ["normal_mild", "moderate", "severe"]
    objs = {
        "levels": FakeLocalizer({k: (0.0, 0.0, z) for k, z in DISC_Z.items()}, {"L5-S1": 0.3}),
        "mr_canal": FakePredictor("mr_canal", stenosis),
        "mr_foramen": FakePredictor("mr_foramen", stenosis),
        "mr_subarticular": FakePredictor("mr_subarticular", stenosis, crop_px=40),
        "mr_disc": FakePredictor("mr_disc", ["normal", "bulging", "herniation"], crop_px=64),
    }
    objs.update(extra)
    return ModelPackages.from_loaded(objs), objs


def _run(packages: ModelPackages, **opts) -> Run:
    opts.setdefault("report_synthetic_models", True)  # the fake packages declare no provenance
    return Run(StudyResult("1.2.3", 1), packages, AnalysisOptions(**opts))


def _mr_volumes():
    sag = ([0, 1, 0], [0, 0, -1])
    t2 = _volume(*sag, spacing=4.0, n=15, shape=(160, 120), centre=np.array([1.0, 0, 0]), px=1.5, uid="1.2.9.2")
    t1 = _volume(*sag, spacing=3.5, n=15, shape=(160, 120), centre=np.array([-1.5, 0, 0]), px=1.5, uid="1.2.9.1")
    # Axial blocks only around L3-L4 .. L5-S1, slightly tilted as scanners angle them to the disc.
    axials = [
        _volume([1, 0, 0], [0, np.cos(t), np.sin(t)], spacing=4.0, n=5, shape=(128, 128),
                centre=np.array([0.0, 0.0, DISC_Z[lv] + 1.0]), px=0.8, uid=f"1.2.9.3{i}")
        for i, (lv, t) in enumerate([("L3-L4", 0.1), ("L4-L5", -0.05), ("L5-S1", -0.2)])
    ]
    return t2, t1, axials


def test_mr_crops_grades_sides_and_heatmaps_land_on_the_lesion() -> None:
    t2, t1, axials = _mr_volumes()
    z = DISC_Z["L4-L5"]
    lesion_ax = np.array([15.0, 14.0, z])  # posterior-left of the L4-L5 disc, in the subarticular crop
    for v in axials:
        _paint(v, lesion_ax)
    lesion_for = np.array([18.0, 0.0, z])  # left foramen at L4-L5
    _paint(t1, lesion_for)
    packages, objs = _packages()
    run = _run(packages)
    analyze_mr(run, t2, t1, axials)
    res = run.result

    assert [lv.level for lv in res.levels] == list(DISC_Z)
    by = {(f.condition, f.level, f.laterality.value if f.laterality else None): f for f in res.findings}
    # 5 canal + 10 foramina on the sagittal series; axial ones only where the blocks are (3 discs).
    assert len([f for f in res.findings if f.condition is ConditionValues.SPINAL_CANAL_STENOSIS]) == 5
    assert len([f for f in res.findings if f.condition is ConditionValues.NEURAL_FORAMINAL_NARROWING]) == 10
    assert len([f for f in res.findings if f.condition is ConditionValues.DISC]) == 3
    assert len([f for f in res.findings if f.condition is ConditionValues.SUBARTICULAR_STENOSIS]) == 6
    # One forward pass per task, with every crop of the study in it.
    assert [len(b) for b in objs["mr_foramen"].seen] == [10]
    assert objs["mr_disc"].seen[0].shape == (3, 64, 64)

    sub_l = by[(ConditionValues.SUBARTICULAR_STENOSIS, "L4-L5", "L")]
    sub_r = by[(ConditionValues.SUBARTICULAR_STENOSIS, "L4-L5", "R")]
    assert sub_l.grade == "severe" and sub_r.grade == "normal_mild"
    assert sub_r.heatmap is None and sub_l.heatmap is not None
    disc = by[(ConditionValues.DISC, "L4-L5", None)]
    assert disc.grade == "herniation"
    for f in (sub_l, disc):
        vol = next(v for v in axials if v.series_instance_uid == f.image.series_instance_uid)
        k = vol.sop_instance_uids.index(f.image.sop_instance_uid)
        assert f.heatmap.shape == vol.array.shape[1:]
        assert f.heatmap.max() == pytest.approx(1.0)
        peak = vol.voxel_to_patient([f.image.column, f.image.row, k])[0]
        assert np.linalg.norm(peak[:2] - lesion_ax[:2]) < 3.5, peak
        assert abs(peak[2] - z) < 4.0
    # The foramen lesion is found on the left only, and its peak is on the T1 image at x = +18 mm.
    for_l = by[(ConditionValues.NEURAL_FORAMINAL_NARROWING, "L4-L5", "L")]
    assert for_l.grade == "severe"
    assert by[(ConditionValues.NEURAL_FORAMINAL_NARROWING, "L4-L5", "R")].grade == "normal_mild"
    assert for_l.image.series_instance_uid == t1.series_instance_uid
    k = t1.sop_instance_uids.index(for_l.image.sop_instance_uid)
    peak = t1.voxel_to_patient([for_l.image.column, for_l.image.row, k])[0]
    assert np.linalg.norm(peak - lesion_for) < 3.5
    # Canal crops come from the T2 series; unaffected levels are normal with no heatmap.
    canal = by[(ConditionValues.SPINAL_CANAL_STENOSIS, "L2-L3", None)]
    assert canal.image.series_instance_uid == t2.series_instance_uid and canal.heatmap is None
    # Axial images missing at L1-L2 and L2-L3 are said, with the distance; low confidence too.
    assert any("mr_disc at L1-L2" in w and "mm from the point" in w for w in res.warnings)
    assert any("low localization confidence" in w and "L5-S1 (0.30)" in w for w in res.warnings)
    assert {m.task for m in res.models} == {"levels", "mr_canal", "mr_foramen", "mr_disc", "mr_subarticular"}
    assert {"localize", "crops", "classify", "explain"} <= set(res.timings)
    # the sagittal grader and the segmenter are not among the fakes
    assert res.not_run == {"mr_disc_grading": "not provided", "spine_segmentation": "not provided"}


def test_mr_missing_packages_and_series_are_reported_not_invented() -> None:
    t2, _, _ = _mr_volumes()
    packages, objs = _packages()
    del packages.loaded["mr_canal"]
    packages.missing["mr_canal"] = "no model package installed in models/packages"
    run = _run(packages)
    analyze_mr(run, t2, None, [])
    res = run.result
    assert res.not_run["mr_canal"] == "no model package installed in models/packages"
    assert "no axial T2" in res.not_run["mr_disc"]
    assert not any(f.condition is ConditionValues.SPINAL_CANAL_STENOSIS for f in res.findings)
    # Foramina fall back to the T2 series, with a warning.
    assert all(f.image.series_instance_uid == t2.series_instance_uid for f in res.findings)
    assert len(res.findings) == 10
    assert any("no sagittal T1" in w for w in res.warnings)


def test_mr_levels_not_visible_and_no_levels() -> None:
    t2, t1, axials = _mr_volumes()
    loc = FakeLocalizer({k: (0.0, 0.0, z) for k, z in DISC_Z.items() if k != "L1-L2"})
    packages, _ = _packages(levels=loc)
    run = _run(packages)
    analyze_mr(run, t2, t1, axials)
    assert any("L1-L2 not visible" in w for w in run.result.warnings)
    assert "L1-L2" not in {f.level for f in run.result.findings}

    packages, _ = _packages(levels=FakeLocalizer({}))
    run = _run(packages)
    analyze_mr(run, t2, t1, axials)
    assert run.result.findings == [] and run.result.levels == []
    assert run.result.not_run["mr_canal"] == "no disc level located"
    assert any("found no level" in w for w in run.result.warnings)


def test_heatmap_threshold_option() -> None:
    t2, t1, axials = _mr_volumes()
    packages, _ = _packages()
    run = _run(packages, heatmap_min_severity=0)
    analyze_mr(run, t2, t1, axials)
    assert all(f.heatmap is not None for f in run.result.findings)


def test_ct_reformat_localizes_and_flags_level_disagreement() -> None:
    # 60 axial slices of 3 mm covering L3-L4 .. L5-S1.
    ax = _volume([1, 0, 0], [0, 1, 0], spacing=3.0, n=60, shape=(96, 96), centre=np.array([0, 0, -25.0]),
                 px=1.2, uid="1.2.9.7")
    _paint(ax, np.array([8.0, 10.0, DISC_Z["L4-L5"]]))
    loc = FakeLocalizer({k: (0.0, 0.0, DISC_Z[k]) for k in ("L3-L4", "L4-L5", "L5-S1")})
    # The level double reads every image as L4-L5, so L3-L4 and L5-S1 disagree.
    level = FakePredictor("ct_level", ["L3-L4", "L4-L5", "L5-S1"], crop_px=48)
    level.predict = lambda crops: np.tile([0.1, 0.8, 0.1], (len(crops), 1))
    packages = ModelPackages.from_loaded(
        {"levels": loc, "ct_disc": FakePredictor("ct_disc", ["normal", "bulging", "herniation"], 80),
         "ct_level": level}
    )
    run = _run(packages)
    analyze_ct(run, ax)
    res = run.result
    # The localizer saw a sagittal reformat (slices along x), not the axial stack.
    shape, aff = loc.calls[0]
    assert abs(aff[0, 2]) > 0 and aff[0, 0] == 0 and shape != ax.array.shape
    assert [f.level for f in res.findings] == ["L3-L4", "L4-L5", "L5-S1"]
    hern = [f for f in res.findings if f.grade == "herniation"]
    assert [f.level for f in hern] == ["L4-L5"]
    k = ax.sop_instance_uids.index(hern[0].image.sop_instance_uid)
    peak = ax.voxel_to_patient([hern[0].image.column, hern[0].image.row, k])[0]
    assert np.linalg.norm(peak - [8.0, 10.0, DISC_Z["L4-L5"]]) < 3.0
    flagged = [w for w in res.warnings if w.startswith("CT level check")]
    assert len(flagged) == 2 and any("L3-L4 image as L4-L5" in w for w in flagged)
    assert "reporting the geometric level L3-L4" in flagged[0]
    # Levels refer to axial images of the study, not to the reformat.
    assert all(lv.image.series_instance_uid == ax.series_instance_uid for lv in res.levels)
    assert "reformat" in res.timings


def test_xray_finding_on_the_whole_image() -> None:
    img = _volume([1, 0, 0], [0, 0, -1], spacing=1.0, n=1, shape=(300, 200), centre=np.zeros(3), uid="1.2.9.8")
    img.array[0, 200:220, 40:60] = LESION
    xr = FakePredictor("xray", ["normal", "scoliosis", "spondylolisthesis"], crop_px=64)
    run = _run(ModelPackages.from_loaded({"xray": xr}))
    analyze_xray(run, [img])
    (f,) = run.result.findings
    assert f.level == "lumbar spine" and f.grade == "spondylolisthesis"
    assert f.heatmap.shape == (300, 200)
    assert 195 <= f.image.row <= 225 and 35 <= f.image.column <= 65


def test_model_packages_record_why_each_is_missing(tmp_path) -> None:
    import json

    broken = tmp_path / "disc-v1"  # found by the task in its config, whatever the folder name
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"task": "mr_disc", "weights": "model.safetensors"}))
    pk = ModelPackages([tmp_path], tasks=["mr_disc", "mr_canal"])
    assert pk.get("mr_disc") is None and pk.info("mr_disc") is None
    assert pk.reason("mr_disc").startswith(f"model package {broken} failed to load")
    assert pk.reason("mr_canal") == f"no model package installed in {tmp_path}"
    assert pk.reason("levels") == "not requested"
    with pytest.raises(TypeError, match="dirs"):
        ModelPackages(str(tmp_path))
    with pytest.raises(ValueError, match="tasks"):
        ModelPackages([tmp_path], tasks=["bogus"])
    with pytest.raises(ValueError, match="loaded"):
        ModelPackages.from_loaded({"bogus": object()})


def test_a_failing_model_costs_only_its_own_findings() -> None:
    t2, t1, axials = _mr_volumes()
    packages, objs = _packages()

    def boom(crops):
        raise RuntimeError("CUDA out of memory")

    objs["mr_disc"].predict = boom
    run = _run(packages)
    analyze_mr(run, t2, t1, axials)
    assert run.result.not_run["mr_disc"] == "the model failed: RuntimeError: CUDA out of memory"
    assert not any(f.condition is ConditionValues.DISC for f in run.result.findings)
    assert any(f.condition is ConditionValues.SPINAL_CANAL_STENOSIS for f in run.result.findings)
