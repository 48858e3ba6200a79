"""Level localizer training: samples, targets, folds, metrics, a few training steps, evaluate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.localizer import LevelLocalizer, LevelPoint, LocalizationResult
from training.levels import (
    TRAIN_SHAPE,
    LevelCase,
    case_folds,
    load_cases,
    make_sample,
    ras_to_lps,
    save_package,
    score_case,
    summarise,
    to_dicom_geometry,
    train_model,
)

pytestmark = pytest.mark.slow  # trains level networks for a few steps

LEVELS = ["T12", "L1", "L2", "L3", "L4", "L5"]


def phantom_case(name: str = "SYN-01", dataset: str = "SYN") -> LevelCase:
    """A 1 mm volume with box-shaped bodies every 34 mm along i, labelled like the real data."""
    ni, nj, nk = 260, 120, 60
    img = np.full((ni, nj, nk), 20, np.uint8)
    verts, sup, axes, discs = {}, {}, {}, {}
    for n, level in enumerate(LEVELS):
        ci = 30 + 34 * n
        img[ci - 12:ci + 13, 30:65, 15:45] = 120
        img[ci + 13:ci + 22, 32:63, 18:42] = 220  # disc below
        verts[level] = np.array([ci, 47.0, 30.0])
        sup[level] = np.array([ci - 12, 47.0, 30.0])
        axes[level] = np.array([1.0, 0.0, 0.0])
    for up, lo in zip(LEVELS[:-1], LEVELS[1:]):
        discs[f"{up}-{lo}"] = (verts[up] + verts[lo]) / 2
    discs["L5-S1"] = verts["L5"] + np.array([17.0, 0, 0])
    aff = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])
    return LevelCase(name, dataset, img, aff, verts, sup, axes, discs, frozenset({"L5-S1"}))


def test_to_dicom_geometry_maps_labels_to_the_same_point() -> None:
    case = phantom_case()
    arr, aff = to_dicom_geometry(case.image, case.affine)
    assert arr.shape == (60, 260, 120)
    i, j, k = case.vertebrae["L3"]
    lps = aff[:3, :3] @ np.array([j, i, k]) + aff[:3, 3]
    np.testing.assert_allclose(lps, ras_to_lps(case.affine[:3, :3] @ np.array([i, j, k]) + case.affine[:3, 3]))
    # sagittal: slice axis left-right, rows inferior, columns posterior
    assert abs(aff[0, 2]) == 1 and aff[2, 1] == -1 and aff[1, 0] == 1


def test_sample_targets_sit_on_the_labelled_points() -> None:
    case = phantom_case()
    x, y, m = make_sample(case, np.random.default_rng(0), augment=False)
    assert x.shape == (3,) + TRAIN_SHAPE and y.shape == (3,) + TRAIN_SHAPE and m.shape == y.shape
    assert 0.0 <= x.min() and x.max() <= 1.0
    # one lumbosacral peak, at the box structure's L5-S1 point: below every body peak
    r2, _ = np.unravel_index(np.argmax(y[2]), y[2].shape)
    body_rows = np.nonzero(y[0].max(axis=1) > 0.9)[0]
    assert y[2].max() > 0.9 and r2 > body_rows.max()
    # imaged but unlabelled anatomy above the top body is ignored for bodies and discs, not for
    # the anchor; the padding outside the image always counts as background
    top = body_rows.min()
    image_rows = np.nonzero(x[1].max(axis=1) > 0)[0]
    assert image_rows.min() < top - 2
    col = int(np.argmax(x[1, top]))
    assert m[0, image_rows.min() + 1, col] == 0 and m[1, image_rows.min() + 1, col] == 0
    assert m[2].min() == 1.0
    assert m[0, 0].min() == 1.0 and m[:, :, 0].min() == 1.0


def test_augmented_samples_vary_and_stay_finite() -> None:
    case = phantom_case()
    rng = np.random.default_rng(1)
    xs = [make_sample(case, rng)[0] for _ in range(4)]
    assert all(np.isfinite(x).all() for x in xs)
    assert not np.allclose(xs[0], xs[1])


def test_folds_are_case_grouped_and_spread_datasets() -> None:
    cases = [phantom_case(f"A-{i}", "A") for i in range(7)] + [phantom_case(f"B-{i}", "B") for i in range(3)]
    folds = case_folds(cases, 5, seed=0)
    names = [n for f in folds for n in f]
    assert sorted(names) == sorted(c.name for c in cases)  # each case in exactly one fold
    assert all(1 <= len(f) <= 3 for f in folds)
    assert sum(any(n.startswith("B") for n in f) for f in folds) == 3


def result_from(case: LevelCase, shift: int = 0, noise_mm: float = 0.0) -> LocalizationResult:
    """Points at the labelled positions (optionally renamed ``shift`` levels up)."""
    rng = np.random.default_rng(0)
    order = LEVELS
    pts = []
    for n, level in enumerate(order):
        name = order[n - shift] if n - shift >= 0 else None
        if name is None:
            continue
        v = case.vertebrae[level]
        mm = ras_to_lps(case.affine[:3, :3] @ v + case.affine[:3, 3]) + rng.normal(0, noise_mm, 3)
        pts.append(LevelPoint(name, (0.0, 0.0, 0.0), tuple(mm), 0.9))
    return LocalizationResult(points=pts)


def test_metrics_count_identification_error_and_shift() -> None:
    good, shifted = phantom_case("G", "SYN"), phantom_case("S", "SYN")
    scores = [score_case(good, result_from(good, noise_mm=1.0)), score_case(shifted, result_from(shifted, shift=1))]
    m = summarise(scores, [good, shifted])
    assert m["n_studies"] == 2
    assert m["studies_mislabelled"] == 1 and "S" in m["mislabelled"]
    assert m["id_rate"] == pytest.approx(6 / 12)
    assert 0 < m["per_level"]["L3"]["mean_error_mm"] < 20
    assert m["disc_id_rate"] == 0.0  # no disc predicted: counted as missed, not skipped
    assert m["per_level"]["L5-S1 (approximate)"]["n"] == 2


def test_failed_study_counts_as_missed() -> None:
    case = phantom_case()
    s = score_case(case, LocalizationResult(reason="no sacrum"))
    m = summarise([s], [case])
    assert m["id_rate"] == 0.0 and m["studies_without_result"] == 1 and m["mean_error_mm"] is None


def test_a_few_training_steps_learn_something_and_package(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cases = [phantom_case()]
    x, y, m = (torch.from_numpy(a)[None] for a in make_sample(cases[0], np.random.default_rng(5), augment=False))
    from training.levels import heatmap_loss

    net0 = train_model(cases, steps=1, batch_size=2, widths=(4, 8, 8), workers=0, lr=1e-9)
    with torch.no_grad():
        before = heatmap_loss(net0(x), y, m).item()
    net = train_model(cases, steps=12, batch_size=4, widths=(4, 8, 8), workers=0, lr=1e-2)
    with torch.no_grad():
        after = heatmap_loss(net(x), y, m).item()
    assert after < before
    pkg = save_package(net, tmp_path / "levels", training={"steps": 12}, metrics={"id_rate": None})
    loc = LevelLocalizer.from_package(pkg)
    arr, aff = to_dicom_geometry(cases[0].image, cases[0].affine)
    res = loc(arr, aff)
    assert res.points or res.reason  # an untrained net may find nothing, but says why
    from training.levels import write_model_card

    cv = summarise([score_case(cases[0], res)], cases)
    card = write_model_card(pkg, cv).read_text()
    assert "S1 is not labelled" in card and "| L3 |" in card


def write_levels_folder(root: Path, *cases: LevelCase) -> Path:
    """A folder in the ``levels.json`` format holding ``cases`` (endplates and axes where the case has them)."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    meta: dict = {"cases": {}}
    for case in cases:
        nib.save(nib.Nifti1Image(case.image, case.affine), str(root / f"{case.name}.nii.gz"))
        to_json = lambda v, c=case: {"vox": v.tolist(), "mm": (c.affine[:3, :3] @ v + c.affine[:3, 3]).tolist()}  # noqa: E731
        verts = {}
        for n, v in case.vertebrae.items():
            verts[n] = {"centroid": to_json(v)}
            if n in case.superior_endplates:
                verts[n]["superior_endplate"] = to_json(case.superior_endplates[n])
            if n in case.axes:
                verts[n]["spine_axis_caudal"] = {"vox": case.axes[n].tolist()}
        meta["cases"][case.name] = {
            "dataset": case.dataset, "image": f"{case.name}.nii.gz", "affine": case.affine.tolist(),
            "vertebrae": verts,
            "discs": {n: {**to_json(v), "approximate": n in case.approximate_discs} for n, v in case.discs.items()},
        }
    (root / "levels.json").write_text(json.dumps(meta))
    return root


def test_evaluate_command_writes_metrics_plots_and_overlays(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.levels_cli import app

    case = phantom_case()
    data = write_levels_folder(tmp_path / "data", case)
    loaded = load_cases(data)[0]
    np.testing.assert_allclose(loaded.vertebrae["L2"], case.vertebrae["L2"])
    torch.manual_seed(0)
    pkg = save_package(train_model([case], steps=1, batch_size=2, widths=(4, 8, 8), workers=0),
                       tmp_path / "pkg", training={}, metrics={})
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["evaluate", str(data), "--out", str(out), "--package", str(pkg)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("id_rate", "mean_error_mm", "p95_error_mm", "disc_id_rate", "studies_mislabelled", "n_studies"):
        assert key in metrics
    assert metrics["n_studies"] == 1
    assert (out / "error_per_level.png").stat().st_size > 1000
    assert (out / "overlays" / f"{case.name}.png").is_file()


def test_phantom_slabs_put_targets_on_the_rendered_levels() -> None:
    from training.levels import CHANNELS, make_phantom_sample, render_phantom_slabs

    slab = render_phantom_slabs([3], contrasts=("T2",))[0]
    assert slab.images.shape[0] == 5 and np.isfinite(slab.images).all()
    n_vert = sum(1 for ch, *_ in slab.points if ch == 0)
    n_disc = sum(1 for ch, *_ in slab.points if ch == 1)
    # bodies from the top level (T10-L1) to L5, S1 derived and not a target; one disc below each body
    assert 5 <= n_vert <= 8 and n_disc == n_vert
    assert sum(1 for ch, *_ in slab.points if ch == CHANNELS.index("lumbosacral")) == 1
    x, y, m = make_phantom_sample(slab, np.random.default_rng(0), augment=False)
    assert x.shape == (3,) + TRAIN_SHAPE and y.shape == (len(CHANNELS),) + TRAIN_SHAPE
    # every visible target is a peak of height ~1 on the centre image, and the maps keep bodies and
    # discs apart: no disc target where a body target peaks
    assert y[0].max() > 0.9 and y[1].max() > 0.9
    r, q = np.unravel_index(np.argmax(y[0]), y[0].shape)
    assert y[1][r, q] < 0.05


def test_partly_labelled_cases_are_scored_on_what_is_labelled(tmp_path: Path) -> None:
    """An external set may label only discs, or only vertebrae, or add S1: each is scored as labelled."""
    from dataclasses import replace

    full = phantom_case("FULL")
    discs_only = replace(phantom_case("DISCS"), vertebrae={}, superior_endplates={}, axes={})
    verts_only = replace(phantom_case("VERTS"), discs={}, approximate_discs=frozenset())
    with_s1 = phantom_case("S1")
    with_s1.vertebrae["S1"] = with_s1.vertebrae["L5"] + np.array([34.0, 0.0, 0.0])
    # written to and read back from one levels.json folder, as `discus evaluate levels` reads it
    data = write_levels_folder(tmp_path / "data", full, discs_only, verts_only, with_s1)
    loaded = {c.name: c for c in load_cases(data)}
    assert not loaded["DISCS"].vertebrae and loaded["DISCS"].discs
    assert not loaded["VERTS"].discs and "S1" in loaded["S1"].vertebrae

    scores = [score_case(loaded[n], result_from(loaded["FULL"])) for n in ("DISCS", "VERTS", "S1")]
    m = summarise(scores, list(loaded.values()))
    # vertebrae: 6 of VERTS + 6 of S1 found, S1 itself not predicted -> 12 of 13
    assert m["n_vertebrae"] == 13 and m["id_rate"] == pytest.approx(12 / 13)
    assert m["per_level"]["S1"]["n"] == 1 and m["per_level"]["S1"]["id_rate"] == 0.0
    # discs: only the DISCS and S1 cases label them, and no disc is predicted
    assert m["per_level"]["L2-L3"]["n"] == 2
    assert scores[0].identified and all(k in loaded["DISCS"].discs for k in scores[0].identified)


def test_negative_samples_have_no_targets_and_make_up_their_share() -> None:
    from training.levels import NEGATIVE_FRACTION, LevelSamples, make_negative_sample

    rng = np.random.default_rng(3)
    for _ in range(9):  # every kind: noise, smooth field, blobs
        x, y, m = make_negative_sample(rng)
        assert x.shape == (3,) + TRAIN_SHAPE and np.isfinite(x).all() and x.max() > 0.5
        assert y.max() == 0.0 and m.min() == 1.0  # all negative, all counted
    ds = LevelSamples([phantom_case()], length=400, seed=1)
    empty = sum(float(ds[i][1].max()) == 0.0 for i in range(len(ds)))
    assert 0.5 * NEGATIVE_FRACTION * 400 <= empty <= 2.0 * NEGATIVE_FRACTION * 400
    assert sum(float(LevelSamples([phantom_case()], 50, augment=False)[i][1].max()) == 0.0 for i in range(50)) == 0


def test_training_leaves_subnormal_floats_representable() -> None:
    """Training flushes denormals to zero for speed; the process-wide flag is set back after it."""
    train_model([phantom_case()], steps=1, batch_size=2, widths=(4, 8, 8), workers=0)
    assert torch.tensor(1e-40, dtype=torch.float32).item() != 0.0
    assert (torch.tensor([1e-38], dtype=torch.float32) / 1e4).item() != 0.0


def test_train_command_cross_validates_and_ships_an_ensemble(tmp_path: Path) -> None:
    """``discus train levels`` end to end on two synthetic cases: 2 folds, 2 members, 2 steps each."""
    from typer.testing import CliRunner

    from training.levels_cli import app

    data = write_levels_folder(tmp_path / "data", phantom_case("SYN-01"), phantom_case("SYN-02"))
    pkg, out = tmp_path / "pkg", tmp_path / "cv"
    r = CliRunner().invoke(app, ["train", "--data-dir", str(data), "--package-dir", str(pkg), "--out", str(out),
                                 "--folds", "2", "--steps", "2", "--members", "2", "--phantom-seeds", "0",
                                 "--seed", "5"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((pkg / "config.json").read_text())
    assert len(cfg["weights"]) == 2 and cfg["training"]["member_seeds"] == [5, 6]
    assert len(LevelLocalizer.from_package(pkg).members) == 2
    for f in range(2):  # every fold was scored as an ensemble, with its own seeds
        fold_cfg = json.loads((out / "folds" / f"fold{f}" / "config.json").read_text())
        assert fold_cfg["training"]["seeds"] == [5 + f, 6 + f]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_studies"] == 2
    assert (pkg / "MODEL_CARD.md").read_text().count("cross-validation") >= 1
