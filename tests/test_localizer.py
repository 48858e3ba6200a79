"""Level localizer: geometry, naming from the sacrum, absent levels, bad input, shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import PackageError
from models.localizer import (
    CHANNELS,
    CRANIOCAUDAL,
    LevelLocalizer,
    LevelNet,
    Peak,
    SagittalGrid,
    chain_from_sacrum,
    resample_slices,
    reslab,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "lumbar-mri-levels"
PACKAGE = ROOT / "models" / "packages" / "levels"


def sagittal_affine(spacing=(0.8, 0.8, 4.0), tilt_deg=0.0, reverse=False, n_slices=12,
                    origin=(-20.0, -150.0, 180.0)) -> np.ndarray:
    """(column, row, slice) -> LPS for a sagittal stack: columns posterior, rows inferior."""
    t = np.radians(tilt_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])  # about z
    a = np.eye(4)
    a[:3, 0] = rot @ np.array([0, 1.0, 0]) * spacing[0]
    a[:3, 1] = np.array([0, 0, -1.0]) * spacing[1]
    a[:3, 2] = rot @ np.array([1.0, 0, 0]) * spacing[2]
    a[:3, 3] = origin
    if reverse:
        a[:3, 3] = a[:3, 3] + (n_slices - 1) * a[:3, 2]
        a[:3, 2] = -a[:3, 2]
    return a


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("tilt", [0.0, 20.0])
def test_grid_round_trip_oblique(tilt: float) -> None:
    aff = sagittal_affine(tilt_deg=tilt)
    grid = SagittalGrid.for_stack((12, 400, 380), aff)
    rows, cols, slices = np.array([3.2, 60.0, 120.5]), np.array([7.0, 55.5, 100.0]), np.array([0.0, 4.5, 11.0])
    xyz = grid.pixel_to_patient(rows, cols, slices)
    back = grid.patient_to_pixel(xyz)
    np.testing.assert_allclose(back, np.stack([rows, cols, slices], 1), atol=1e-9)
    # grid rows run inferior and columns posterior whatever the obliquity
    assert np.asarray(grid.v)[2] < -0.9 and np.asarray(grid.u)[1] > 0.9


def test_reversed_slice_order_samples_the_same_plane() -> None:
    rng = np.random.default_rng(0)
    arr = rng.random((12, 300, 280)).astype(np.float32)
    fwd = sagittal_affine()
    rev = sagittal_affine(reverse=True)
    grid_f = SagittalGrid.for_stack(arr.shape, fwd)
    grid_r = SagittalGrid.for_stack(arr.shape, rev)
    a = resample_slices(arr, fwd, grid_f, [3])
    b = resample_slices(arr[::-1].copy(), rev, grid_r, [12 - 1 - 3])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_reslab_averages_thin_slices_and_keeps_geometry() -> None:
    arr = np.arange(40, dtype=np.float32)[:, None, None] * np.ones((40, 20, 20), np.float32)
    aff = sagittal_affine(spacing=(1.0, 1.0, 1.0))
    out, out_aff, n = reslab(arr, aff, 4.0)
    assert n == 4 and out.shape == (10, 20, 20)
    assert out[0, 0, 0] == pytest.approx(1.5)
    # slab 0 centre lies at the mean position of source slices 0..3
    centre = out_aff[:3, 3]
    np.testing.assert_allclose(centre, aff[:3, 3] + 1.5 * aff[:3, 2])


# --------------------------------------------------------------------------- naming


def spine_peaks(n: int, spacing_px: float = 12.0) -> tuple[Peak, list[Peak]]:
    anchor = Peak(100.0, 50.0, 0.9)
    bodies = [Peak(100.0 - (k + 0.5) * spacing_px, 50.0 + k, 0.8) for k in range(n)]
    return anchor, bodies


def test_chain_names_from_the_sacrum_upwards() -> None:
    anchor, bodies = spine_peaks(6)
    shuffled = [bodies[i] for i in (3, 0, 5, 1, 4, 2)]
    chain = chain_from_sacrum(anchor, shuffled + [Peak(130.0, 50.0, 0.9)])  # a peak below the anchor
    assert chain.names == ("L5", "L4", "L3", "L2", "L1", "T12")
    assert list(chain.peaks) == bodies


def test_chain_stops_at_a_gap_instead_of_shifting_names() -> None:
    anchor, bodies = spine_peaks(6)
    missing_l3 = bodies[:2] + bodies[3:]
    chain = chain_from_sacrum(anchor, missing_l3)
    assert chain.names == ("L5", "L4")


def test_chain_without_bodies_is_empty() -> None:
    anchor, _ = spine_peaks(0)
    assert chain_from_sacrum(anchor, []).names == ()


class HeatmapOracle(nn.Module):
    """Stands in for the network: Gaussians at known patient points on the grid the localizer uses."""

    def __init__(self, points: dict[str, list[np.ndarray]], grid: SagittalGrid, candidates: list[int],
                 normal: np.ndarray, heights: dict[str, list[float]] | None = None) -> None:
        super().__init__()
        self.points, self.grid, self.candidates, self.normal = points, grid, candidates, normal
        self.heights = heights or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid.shape
        rr, qq = np.mgrid[0:h, 0:w]
        out = np.zeros((x.shape[0], len(CHANNELS), h, w), np.float32)
        for b, s in enumerate(self.candidates):
            plane = self.grid.pixel_to_patient([0], [0], [s])[0]
            for c, name in enumerate(CHANNELS):
                heights = self.heights.get(name, [1.0] * len(self.points.get(name, [])))
                for p, height in zip(self.points.get(name, []), heights):
                    r, q, _ = self.grid.patient_to_pixel(p)[0]
                    lr = float((p - plane) @ self.normal)
                    amp = height * np.exp(-lr ** 2 / (2 * 6.0 ** 2))
                    out[b, c] = np.maximum(out[b, c], amp * np.exp(-((rr - r) ** 2 + (qq - q) ** 2) / 2.9))
        return torch.from_numpy(out)


def oracle_case(affine: np.ndarray, shape=(12, 400, 380), top: int = 5):
    """Bodies every 34 mm up from an L5-S1 point, discs between; returns localizer and truth."""
    vol_centre = affine[:3, :3] @ np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2]) + affine[:3, 3]
    up = np.array([0.0, -0.25, 1.0]) / np.linalg.norm([0.0, -0.25, 1.0])
    anchor = vol_centre + np.array([0.0, 0.0, -110.0])
    names = ["L5", "L4", "L3", "L2", "L1", "T12", "T11"][:top]
    truth = {"L5-S1": anchor}
    for k, name in enumerate(names):
        truth[name] = anchor + (17.0 + 34.0 * k) * up
        if k:
            truth[f"{name}-{names[k - 1]}"] = anchor + 34.0 * k * up
    pts = {"vertebra": [truth[n] for n in names], "disc": [v for n, v in truth.items() if "-" in n],
           "lumbosacral": [anchor]}
    arr = np.random.default_rng(1).random(shape).astype(np.float32)
    grid = SagittalGrid.for_stack(shape, affine)
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    loc = LevelLocalizer(HeatmapOracle(pts, grid, list(range(shape[0])), normal), {})
    return loc, arr, truth


@pytest.mark.parametrize("tilt,reverse", [(0.0, False), (18.0, False), (0.0, True), (12.0, True)])
def test_points_come_back_in_patient_and_voxel_coordinates(tilt: float, reverse: bool) -> None:
    aff = sagittal_affine(tilt_deg=tilt, reverse=reverse)
    loc, arr, truth = oracle_case(aff)
    res = loc(arr, aff)
    assert res.reason is None, res.reason
    got = res.by_name()
    for name, p in truth.items():
        assert name in got, f"{name} missing"
        assert np.linalg.norm(np.asarray(got[name].point_mm) - p) < 2.5, name
        vox = np.asarray(got[name].voxel)
        np.testing.assert_allclose(aff[:3, :3] @ vox + aff[:3, 3], got[name].point_mm, atol=1e-6)
    # S1 is derived below L5-S1, and the order is cranial to caudal
    assert "S1" in got and got["S1"].point_mm[2] < truth["L5-S1"][2]
    assert got["S1"].confidence < got["L5"].confidence
    assert [p.name for p in res.points] == sorted((p.name for p in res.points), key=CRANIOCAUDAL.index)


def test_absent_levels_stay_absent() -> None:
    aff = sagittal_affine()
    loc, arr, truth = oracle_case(aff, top=3)  # field of view shows L3..L5 only
    names = {p.name for p in loc(arr, aff).points}
    assert {"L5", "L4", "L3", "L4-L5", "L3-L4", "L5-S1"} <= names
    assert not names & {"L2", "L1", "T12", "T11", "T10", "L2-L3", "L1-L2"}


def test_no_sacrum_means_no_levels() -> None:
    aff = sagittal_affine()
    loc, arr, truth = oracle_case(aff)
    loc.net.points["lumbosacral"] = []
    res = loc(arr, aff)
    assert res.points == [] and "sacrum" in res.reason


# --------------------------------------------------------------------------- bad input


def random_localizer() -> LevelLocalizer:
    torch.manual_seed(0)
    return LevelLocalizer(LevelNet(), {})


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("axial", "not sagittal"),
        ("coronal", "not sagittal"),
        ("one_slice", "slice"),
        ("nan_affine", "geometry"),
        ("skewed", "contradictory"),
        ("blank", "blank"),
        ("two_d", "3-D"),
    ],
)
def test_bad_input_gives_a_reason_not_levels(case: str, fragment: str) -> None:
    arr = np.random.default_rng(0).random((10, 64, 64)).astype(np.float32)
    aff = sagittal_affine()
    if case == "axial":
        aff = np.diag([0.8, 0.8, 4.0, 1.0])
    elif case == "coronal":
        aff = np.eye(4)
        aff[:3, 0], aff[:3, 1], aff[:3, 2] = [0.8, 0, 0], [0, 0, -0.8], [0, 4.0, 0]
    elif case == "one_slice":
        arr = arr[:1]
    elif case == "nan_affine":
        aff = aff.copy()
        aff[0, 3] = np.nan
    elif case == "skewed":
        aff = aff.copy()
        aff[:3, 1] = aff[:3, 0] * 0.5 + aff[:3, 1]
    elif case == "blank":
        arr = np.zeros_like(arr)
    elif case == "two_d":
        arr = arr[0]
    res = random_localizer()(arr, aff)
    assert res.points == []
    assert fragment in res.reason


# --------------------------------------------------------------------------- packages


def test_package_round_trip_and_hash_check(tmp_path: Path) -> None:
    from training.levels import save_package

    torch.manual_seed(0)
    net = LevelNet(widths=(4, 8, 8))
    pkg = save_package(net, tmp_path / "pkg", training={"steps": 0}, metrics={})
    cfg = json.loads((pkg / "config.json").read_text())
    assert cfg["task"] == "levels" and cfg["class_names"] == list(CHANNELS)
    loc = LevelLocalizer.from_package(pkg)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loc.net(x), net.eval()(x), atol=2e-3, rtol=0)
    data = bytearray((pkg / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pkg / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256"):
        LevelLocalizer.from_package(pkg)


def test_ensemble_package_averages_its_members_and_checks_every_digest(tmp_path: Path) -> None:
    from training.levels import merge_packages, save_package

    torch.manual_seed(1)
    nets = [LevelNet(widths=(4, 8, 8)).eval() for _ in range(2)]
    pkg = save_package(nets, tmp_path / "ens", training={"steps": 0}, metrics={})
    cfg = json.loads((pkg / "config.json").read_text())
    assert cfg["weights"] == ["model-0.safetensors", "model-1.safetensors"] and len(cfg["weights_sha256"]) == 2
    assert len(cfg["sha256"]) == 64 and cfg["sha256"] not in cfg["weights_sha256"]
    loc = LevelLocalizer.from_package(pkg)
    assert len(loc.members) == 2
    # the maps of a series are the mean of the two members' maps (fp16 weights: small tolerance)
    array = np.random.default_rng(0).random((6, 40, 36)).astype(np.float32) * 100 + 1
    affine = sagittal_affine(spacing=(3.0, 3.0, 4.0), n_slices=6)
    maps, *_ = loc.heatmaps(array, affine)
    singles = []
    for i, net in enumerate(nets):
        one = save_package(net, tmp_path / f"one{i}", training={}, metrics={})
        singles.append(LevelLocalizer.from_package(one).heatmaps(array, affine)[0].heat)
    np.testing.assert_allclose(maps.heat, (singles[0] + singles[1]) / 2, atol=1e-4)
    # two single packages merged give the same ensemble
    merged = merge_packages([tmp_path / "one0", tmp_path / "one1"], tmp_path / "merged", {}, {})
    np.testing.assert_allclose(LevelLocalizer.from_package(merged).heatmaps(array, affine)[0].heat,
                               maps.heat, atol=1e-6)
    # a changed member, or a package digest that is not the members' digest, is refused
    cfg["sha256"] = "0" * 64
    (pkg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackageError, match="members' sha256"):
        LevelLocalizer.from_package(pkg)
    data = bytearray((merged / "model-1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (merged / "model-1.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model-1.safetensors"):
        LevelLocalizer.from_package(merged)



def test_ensemble_median_follows_the_majority_and_mean_is_the_default() -> None:
    nets = [LevelNet(widths=(4, 8, 8)) for _ in range(3)]
    maps = torch.stack([torch.full((1, 3, 4, 4), v) for v in (0.1, 0.2, 0.9)])  # one member far off
    median = LevelLocalizer(nets, {"postprocessing": {"ensemble": "median"}})
    assert float(median._combine(maps).max()) == pytest.approx(0.2)
    assert float(LevelLocalizer(nets)._combine(maps).max()) == pytest.approx(0.4)
    # two members: the median of two is their mean
    assert float(median._combine(maps[:2]).max()) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="ensemble"):
        LevelLocalizer(nets, {"postprocessing": {"ensemble": "vote"}})

def test_missing_package_is_a_package_error(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="config.json"):
        LevelLocalizer.from_package(tmp_path)


# --------------------------------------------------------------------------- shipped model, real data


def shipped() -> LevelLocalizer:
    if not (PACKAGE / "config.json").is_file():
        pytest.skip(f"no shipped levels package at {PACKAGE}")
    return LevelLocalizer.from_package(PACKAGE)


def test_shipped_model_is_never_confident_on_noise() -> None:
    loc = shipped()
    aff = sagittal_affine(spacing=(1.2, 1.2, 4.0))
    answered = 0
    for seed in range(3, 9):
        arr = np.abs(np.random.default_rng(seed).normal(100, 30, (15, 256, 256))).astype(np.float32)
        res = loc(arr, aff)
        assert res.points or res.reason
        answered += bool(res.points)
        assert all(p.confidence < 0.5 for p in res.points), [(p.name, p.confidence) for p in res.points]
    assert answered <= 1  # measured: one of these six noise volumes gets low-confidence levels


def real_volume(name: str, route: str, tmp_path: Path):
    """A shared-data case as a DICOM-geometry stack, and its labels."""
    if not (DATA / "levels.json").is_file():
        pytest.skip(f"shared level data not found at {DATA.resolve()}")
    from training.levels import load_cases, to_dicom_geometry

    case = load_cases(DATA, [name])[0]
    if route == "dicom_series":  # written as 4 mm DICOM images by the project's writer, read back
        from dicom_io.volumes import load_volume
        from dicom_io.writer import write_nifti_as_series

        files = write_nifti_as_series(DATA / f"{name}.nii.gz", tmp_path / "series", slice_thickness=4.0)
        vol = load_volume(files)
        arr, aff = vol.array, vol.affine
    else:  # 4 mm slabs stored in reverse order
        arr, aff = to_dicom_geometry(case.image, case.affine)
        arr, aff, _ = reslab(arr, aff, 4.0)
        n = arr.shape[0]
        arr = arr[::-1].copy()
        aff = aff.copy()
        aff[:3, 3] = aff[:3, 3] + (n - 1) * aff[:3, 2]
        aff[:3, 2] = -aff[:3, 2]
    return case, arr, aff


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["VB2-05", "VB3-04", "VB3-48"])
@pytest.mark.parametrize("route", ["dicom_series", "reversed_slabs"])
def test_shipped_model_never_shifts_level_names(name: str, route: str, tmp_path: Path) -> None:
    from training.levels import score_case

    loc = shipped()
    case, arr, aff = real_volume(name, route, tmp_path)
    res = loc(arr, aff)
    score = score_case(case, res)
    assert not score.mislabelled, score.mislabelled
    assert res.points or res.reason
    for p in res.points:  # points lie in the series and agree with their voxel coordinates
        np.testing.assert_allclose(aff[:3, :3] @ np.asarray(p.voxel) + aff[:3, 3], p.point_mm, atol=1e-4)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["VB2-05", "VB3-04", "VB3-48"])
def test_shipped_model_finds_levels_within_tolerance(name: str, tmp_path: Path) -> None:
    from training.levels import score_case

    loc = shipped()
    case, arr, aff = real_volume(name, "dicom_series", tmp_path)
    res = loc(arr, aff)
    score = score_case(case, res)
    for level in ("L1", "L2", "L3", "L4", "L5"):
        assert score.identified.get(level), (level, score.errors, res.reason)
        assert score.errors[level] < 10.0


def test_irregular_steps_cut_the_chain_above_them() -> None:
    from models.localizer import regular_prefix

    anchor, bodies = spine_peaks(5)
    stray = Peak(bodies[2].row - 7.0, bodies[2].col, 0.9)  # 21 mm above L3: too close for L2
    chain = chain_from_sacrum(anchor, bodies[:3] + [stray])
    assert chain.names == ("L5", "L4", "L3", "L2")
    assert regular_prefix(chain).names == ("L5", "L4", "L3")


@pytest.mark.parametrize("contrast", ["T2", "T1"])
def test_shipped_model_names_the_levels_of_a_synthetic_phantom(contrast: str) -> None:
    """The product's own synthetic studies (demo, end-to-end tests): a seed not used in training."""
    from dicom_io import phantom

    anat = phantom.make_anatomy(10005, phantom.random_findings(np.random.default_rng(10005)))
    truth = phantom.ground_truth(anat)["levels"]
    ser = phantom.render_mr(anat, contrast, "sagittal")
    res = shipped()(ser.array, ser.affine)
    got = res.by_name()
    for name in ("L1", "L2", "L3", "L4", "L5", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"):
        assert name in got, (name, res.reason)
        assert np.linalg.norm(np.asarray(got[name].point_mm) - np.asarray(truth[name])) < 6.0, name


def test_fused_network_gives_the_same_heatmaps() -> None:
    torch.manual_seed(0)
    net = LevelNet(widths=(4, 8, 8))
    # non-trivial BatchNorm statistics, as after training
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 3, 32, 24) * 3.0 + 0.5)
    net.eval()
    fused = net.fused()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = torch.rand(2, 3, 40, 36)
    with torch.no_grad():
        np.testing.assert_allclose(fused(x).numpy(), net(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("ratio,expect_shift", [(0.8, False), (0.0, True)])
def test_a_lower_junction_nearly_as_strong_is_the_lumbosacral_one(ratio: float, expect_shift: bool) -> None:
    """L4-L5 mistaken for the junction (strongest), the true L5-S1 a little weaker below it."""
    aff = sagittal_affine()
    loc, arr, truth = oracle_case(aff, top=6)
    oracle = loc.net
    oracle.points["lumbosacral"] = [truth["L4-L5"], truth["L5-S1"]]
    oracle.heights = {"lumbosacral": [1.0, 0.9]}
    loc = LevelLocalizer(oracle, {"postprocessing": {"caudal_anchor_ratio": ratio}})
    res = loc(arr, aff)
    got = res.by_name()
    err = np.linalg.norm(np.asarray(got["L5"].point_mm) - truth["L5"])
    if expect_shift:  # without the rule the strongest candidate wins and every name moves up one level
        assert err > 20.0
    else:
        assert err < 2.5 and np.linalg.norm(np.asarray(got["L5-S1"].point_mm) - truth["L5-S1"]) < 2.5
    # either way two candidate junctions make the names uncertain, and that is said
    assert any("transitional" in w for w in res.warnings)
    assert max(p.confidence for p in res.points) <= 0.5


@pytest.mark.parametrize("below_mm,named", [(0.0, True), (5.0, True), (14.0, False)])
def test_a_body_a_whole_step_above_the_junction_is_not_named_l5(below_mm: float, named: bool) -> None:
    """L5's centre lies about half a step above L5-S1; a whole step means L5 itself was missed."""
    aff = sagittal_affine()
    loc, arr, truth = oracle_case(aff, top=5)
    up = truth["L4"] - truth["L5"]
    up /= np.linalg.norm(up)
    loc.net.points["lumbosacral"] = [truth["L5-S1"] - below_mm * up]
    res = loc(arr, aff)
    if named:
        assert res.reason is None and np.linalg.norm(np.asarray(res.by_name()["L5"].point_mm) - truth["L5"]) < 2.5
    else:  # 31 of 34 mm: the names would all be one level off, so none are given
        assert res.points == [] and "one level off" in res.reason
