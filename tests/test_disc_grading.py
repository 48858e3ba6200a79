"""Disc grading: geometry of single images, upright crops, heads, metrics, package round trip, real data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.crops import CROP_SPECS, crop_for_level
from models.disc_grading import (
    BINARY_HEADS,
    LUMBAR_DISCS,
    OUTPUT_NAMES,
    DiscGrader,
    disc_category,
    disc_crop,
    head_probabilities,
    image_volume,
    split_logits,
)
from models.errors import PackageError
from models.localizer import check_sagittal

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "spider-sagittal"
SHIPPED = ROOT / "models" / "packages" / "mr_disc_grading"
LEVELS = ROOT / "models" / "packages" / "levels"


def need_data() -> None:
    if not (DATA / "gradings.csv").is_file():
        pytest.skip(f"shared SPIDER data not found at {DATA.resolve()}")


def marked_image() -> np.ndarray:
    """120 x 100 image with a bright block at the top left (superior, anterior when anterior-left)."""
    img = np.zeros((120, 100), np.float32) + 10.0
    img[20:40, 10:30] = 200.0
    img[80:90, 60:80] = 100.0
    return img


def test_image_volume_geometry_rows_inferior_columns_posterior() -> None:
    arr, aff = image_volume(marked_image(), (0.5, 0.8))
    assert arr.shape == (3, 120, 100)
    check_sagittal(arr, aff)  # the localizer accepts it
    origin = aff @ [0, 0, 1, 1]
    down = aff @ [0, 10, 1, 1]
    right = aff @ [10, 0, 1, 1]
    assert np.allclose(down[:3] - origin[:3], [0, 0, -5.0])  # 10 rows = 5 mm inferior
    assert np.allclose(right[:3] - origin[:3], [0, 8.0, 0])  # 10 columns = 8 mm posterior
    _, mirrored = image_volume(marked_image(), (0.5, 0.8), anterior_left=False)
    assert (mirrored @ [10, 0, 1, 1])[1] < mirrored[1, 3]  # columns run anterior
    with pytest.raises(ValueError, match="pixel_spacing"):
        image_volume(marked_image(), (0.0, 0.8))


def test_upright_crop_is_the_same_whichever_way_the_image_is_stored() -> None:
    img = marked_image()
    arr, aff = image_volume(img, (1.0, 1.0))
    arr_m, aff_m = image_volume(img[:, ::-1].copy(), (1.0, 1.0), anterior_left=False)
    point = aff @ [30, 40, 1, 1]  # the same pixel of the anatomy in each: column 30, or 69 when mirrored
    point_m = aff_m @ [img.shape[1] - 1 - 30, 40, 1, 1]
    a, geom = crop_for_level(arr, aff, point[:3], CROP_SPECS["mr_disc_grading"], 32)
    b, _ = crop_for_level(arr_m, aff_m, point_m[:3], CROP_SPECS["mr_disc_grading"], 32)
    assert np.allclose(a, b, atol=1e-4)
    assert geom.v[2] < -0.99 and geom.u[1] > 0.99  # rows inferior, columns posterior
    assert a[:8].mean() > a[-8:].mean()  # the bright superior block is at the top


def test_disc_crop_snaps_to_the_nearest_image() -> None:
    arr = np.stack([np.full((60, 60), v, np.float32) for v in (10.0, 50.0, 90.0)])
    _, aff = image_volume(arr[0], (1.0, 1.0))
    point = aff @ [30, 30, 1.4, 1]  # between images 1 and 2, nearer 1
    crop, _, k = disc_crop(arr, aff, point[:3], 16)
    assert k == 1 and np.allclose(crop[4:12, 4:12], 50.0)


def test_heads_split_and_calibrate() -> None:
    z = np.zeros((2, len(OUTPUT_NAMES)))
    z[0, 2], z[0, 5] = 4.0, 2.0  # grade 3, herniation
    parts = split_logits(z)
    assert parts["pfirrmann"].shape == (2, 5) and parts["herniation"].shape == (2,)
    p = head_probabilities(z)
    assert np.allclose(p["pfirrmann"].sum(1), 1.0) and p["pfirrmann"][0].argmax() == 2
    assert p["herniation"][0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    hot = head_probabilities(z, {"herniation": 2.0})
    assert hot["herniation"][0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    with pytest.raises(ValueError, match="logits"):
        split_logits(np.zeros((2, 5)))
    assert disc_category(True, True) == "herniation"
    assert disc_category(False, True) == "bulging"
    assert disc_category(False, False) == "normal"


def test_disc_metrics_perfect_and_chance() -> None:
    from training.discs import disc_metrics

    grade = np.array([0, 1, 2, 3, 4] * 4)
    findings = np.zeros((20, len(BINARY_HEADS)), np.float32)
    findings[::2] = 1
    probs = {"pfirrmann": np.eye(5)[grade]}
    probs.update({h: findings[:, j].copy() for j, h in enumerate(BINARY_HEADS)})
    m = disc_metrics(grade, findings, probs, {h: 0.5 for h in BINARY_HEADS})
    assert m["pfirrmann"]["balanced_accuracy"] == 1.0 and m["pfirrmann"]["within_one"] == 1.0
    assert m["herniation"]["auc"] == 1.0 and m["modic"]["balanced_accuracy"] == 1.0
    off = {"pfirrmann": np.eye(5)[(grade + 2) % 5]}
    off.update({h: 1 - findings[:, j] for j, h in enumerate(BINARY_HEADS)})
    m = disc_metrics(grade, findings, off, {h: 0.5 for h in BINARY_HEADS})
    assert m["pfirrmann"]["exact"] == 0.0 and m["pfirrmann"]["within_one"] == 0.0
    assert m["herniation"]["auc"] == 0.0


@pytest.mark.slow
def test_train_a_few_steps_package_and_grade(tmp_path: Path) -> None:
    """Tiny multi-head training, packaged with domain reference and calibration, loaded and used."""
    from models.config import ModelConfig
    from models.package import save_package, sha256_file
    from models.registry import create_model
    from training.datasets import CropDataset, CropSet
    from training.discs import AUGMENT, fit_domain, fit_heads, preprocessor, targets_of
    from training.loop import TrainSettings

    rng = np.random.default_rng(0)
    n = 24
    images = rng.normal(100, 20, (n, 64, 64)).astype(np.float32)
    grade = np.arange(n) % 5
    images[:, 28:36] += grade[:, None, None] * 30  # a "disc" band whose brightness is the grade
    meta = [{h: int((i + j) % 3 == 0) for j, h in enumerate(BINARY_HEADS)} | {"kind": "t2", "vendor": "X"}
            for i in range(n)]
    crops = CropSet(images, grade, np.arange(n) % 6, [f"pfirrmann_{g}" for g in range(1, 6)], meta)
    torch.manual_seed(0)
    model = create_model("resnet18", small=True, num_classes=len(OUTPUT_NAMES), in_chans=1)
    run = fit_heads(model, CropDataset(crops, preprocessor()), targets_of(crops), None, None,
                    TrainSettings(epochs=2, batch_size=8, device="cpu", progress=False))
    assert len(run["history"]["train_loss"]) == 2 and np.isfinite(run["history"]["train_loss"]).all()
    assert AUGMENT.hflip == 0 and AUGMENT.vflip == 0  # flips would swap endplates or margins
    domain, flagged = fit_domain(model, crops)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    dom = domain.save(pkg)
    cfg = ModelConfig(
        name="t", architecture="resnet18", task="mr_disc_grading", version="0", input_size=(64, 64), in_chans=1,
        class_names=list(OUTPUT_NAMES), preprocessing={"mode": "percentile", "crop_px": 64},
        model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16},
        postprocessing={"thresholds": {h: 0.3 for h in BINARY_HEADS}},
        calibration={"temperatures": {"pfirrmann": 1.5, "herniation": 2.0}},
        domain_check={"file": dom.name, "sha256": sha256_file(dom), "threshold": domain.threshold},
    )
    save_package(model, cfg, pkg, fp16=False)
    grader = DiscGrader.from_package(pkg)
    assert grader.temperatures["herniation"] == 2.0 and grader.thresholds["modic"] == 0.3
    arr, aff = image_volume(rng.normal(100, 20, (200, 160)), (0.8, 0.8))
    points = {"L4-L5": (aff @ [80, 100, 1, 1])[:3], "T12-L1": (aff @ [80, 20, 1, 1])[:3]}
    grades = grader.grade(arr, aff, points)
    assert [g.level for g in grades] == ["L4-L5"]  # only lumbar discs are graded
    g = grades[0]
    assert 1 <= g.pfirrmann <= 5 and sum(g.p_pfirrmann) == pytest.approx(1.0, abs=1e-6)
    assert set(g.probabilities) == set(BINARY_HEADS)
    assert g.findings["modic"] == (g.probabilities["modic"] >= 0.3)
    heat = grader.explain(np.stack([g.crop, g.crop]), ["pfirrmann", "herniation"])
    assert heat.shape == (2, 64, 64) and heat.min() >= 0 and heat.max() <= 1
    assert flagged["uniform_noise_crops"] >= 0.0
    dom.write_bytes(dom.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(PackageError, match="domain"):
        DiscGrader.from_package(pkg)


def test_spider_tables_read_as_the_readme_says() -> None:
    need_data()
    from training.discs import load_gradings, load_series

    series = load_series(DATA)
    grads = load_gradings(DATA)
    assert len(series) == 360 and len({s.patient for s in series}) == 179
    assert {s.kind for s in series} == {"t1", "t2", "t2_SPACE"}
    lumbar = [g for (p, ivd), g in grads.items() if 1 <= ivd <= 5]
    assert len(lumbar) == 895
    assert np.bincount([g["pfirrmann"] for g in lumbar], minlength=6)[1:].tolist() == [141, 194, 261, 170, 129]
    assert sum(g["herniation"] for g in lumbar) == 61 and sum(g["modic"] for g in lumbar) == 330


def test_shipped_package_grades_a_real_image() -> None:
    need_data()
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("the mr_disc_grading package is not installed")
    from models.localizer import LevelLocalizer
    from training.discs import load_series, locate, read_image

    grader = DiscGrader.from_package(SHIPPED)
    assert grader.config.provenance["training_data"][0]["kind"] == "real"
    assert set(grader.temperatures) >= {"pfirrmann", *BINARY_HEADS}
    loc = LevelLocalizer.from_package(LEVELS)
    s = next(s for s in load_series(DATA) if s.series == "104_t2")
    pts, arr, aff, reason = locate(loc, read_image(s.path), s.pixel_spacing)
    assert set(pts) == set(LUMBAR_DISCS), reason
    grades = grader.grade(arr, aff, pts)
    assert [g.level for g in grades] == list(LUMBAR_DISCS)
    assert all(g.in_domain for g in grades)  # a training image lies in the validated domain


@pytest.mark.slow
def test_evaluate_discs_writes_one_row_per_graded_disc(tmp_path: Path) -> None:
    need_data()
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("the mr_disc_grading package is not installed")
    from training.discs import PREDICTION_COLUMNS, evaluate_discs

    sub = tmp_path / "data"
    (sub / "images").mkdir(parents=True)
    keep = {"104_t2", "1_t1"}  # one the localizer names, one it does not
    with open(DATA / "series.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["series"] in keep]
    with open(sub / "series.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        shutil.copy(DATA / "images" / f"{r['series']}.png", sub / "images")
    with open(DATA / "gradings.csv", newline="") as f:
        grads = [r for r in csv.DictReader(f) if r["Patient"] in {r["patient"] for r in rows}]
    with open(sub / "gradings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(grads[0]))
        w.writeheader()
        w.writerows(grads)
    result = evaluate_discs(sub, tmp_path / "out", SHIPPED, LEVELS, progress=False)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == PREDICTION_COLUMNS
        pred = list(reader)
    per_patient = {p: sum(g["Patient"] == p for g in grads) for p in {r["patient"] for r in rows}}
    assert len(pred) == sum(per_patient[r["patient"]] for r in rows)
    located = [p for p in pred if p["series"] == "104_t2" and p["ivd_label"] in "12345"]
    assert len(located) == 5 and all(p["located"] == "true" and p["pfirrmann"] in "12345" for p in located)
    missing = [p for p in pred if p["located"] == "false"]
    assert all(p["p_herniation"] == "" for p in missing)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["metrics"]["all"]["n_discs"] == result["metrics"]["all"]["n_discs"] >= 5
    assert (tmp_path / "out" / "pfirrmann_confusion.png").is_file() and (tmp_path / "out" / "roc.png").is_file()
