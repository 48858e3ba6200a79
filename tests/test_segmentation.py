"""The spine segmenter: level naming, orientation, partial-label loss, training data, package, evaluation.

Synthetic images and masks are labelled as such; the real-data checks skip without ``../shared/data``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import PackageError
from models.measurements import VERTEBRA_LABELS, disc_label
from models.segmentation import (
    BODY,
    CANAL,
    CLASSES,
    DISC,
    SagittalSegmentation,
    SpineSegmenter,
    from_upright_points,
    grid_for,
    label_levels,
    source_labels,
    to_upright,
    upright_axes,
)
from training.segmentation import (
    ALL,
    make_sample,
    new_net,
    partial_label_loss,
    save_package,
    spider_slice,
    train_net,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def synthetic_classes(h: int = 120, w: int = 80) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """Synthetic class map: three bodies with discs between, a canal behind; level points at their centres."""
    c = np.zeros((h, w), np.uint8)
    pts = {}
    for i, name in enumerate(("L3", "L4", "L5")):
        r0 = 10 + i * 35
        c[r0:r0 + 25, 20:50] = BODY
        pts[name] = (r0 + 12.0, 35.0)
        c[r0 + 25:r0 + 33, 22:48] = DISC
        pts[("L3-L4", "L4-L5", "L5-S1")[i]] = (r0 + 29.0, 35.0)
    c[5:115, 55:62] = CANAL
    c[2:4, 2:4] = BODY  # a speck: too small to be named
    return c, pts


def test_label_levels_names_bodies_and_discs_by_the_nearest_point():
    c, pts = synthetic_classes()
    out = label_levels(c, pts, (1.0, 1.0))
    assert out[20, 30] == VERTEBRA_LABELS["L3"] and out[90, 30] == VERTEBRA_LABELS["L5"]
    assert out[39, 30] == disc_label("L3-L4") and out[109, 30] == disc_label("L5-S1")
    assert out[50, 58] == 200
    assert out[3, 3] == 0  # speck
    # a point far from any body names nothing; a missing point leaves its body unnamed
    far = label_levels(c, {"L3": (20.0, 75.0), "L4": pts["L4"]}, (1.0, 1.0))
    assert far[20, 30] == 0 and far[55, 30] == VERTEBRA_LABELS["L4"]
    # two bodies run together (the disc between them missed): neither is named, nor measured as one
    merged = c.copy()
    merged[35:45, 20:50] = BODY
    m2 = label_levels(merged, pts, (1.0, 1.0))
    assert m2[20, 30] == 0 and m2[55, 30] == 0 and m2[90, 30] == VERTEBRA_LABELS["L5"]
    with pytest.raises(ValueError, match="classes"):
        label_levels(np.zeros((2, 2, 2)), pts, (1.0, 1.0))
    with pytest.raises(ValueError, match="pixel_mm"):
        label_levels(c, pts, (0.0, 1.0))


@pytest.mark.parametrize("transpose,flip_r,flip_c", [(False, False, False), (False, True, True), (True, False, True)])
def test_source_labels_follow_the_image_orientation(transpose, flip_r, flip_c):
    """The same anatomy stored flipped or transposed gets the same labels, in the stored orientation."""
    c, pts = synthetic_classes()
    h, w = c.shape
    # an upright sagittal stack (1 mm pixels): columns posterior (+y), rows inferior (-z)
    col_dir, row_dir = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    origin = np.array([0.0, -40.0, 60.0])
    stored = c
    if flip_r:
        origin = origin + row_dir * (h - 1)
        row_dir = -row_dir
        stored = stored[::-1]
    if flip_c:
        origin = origin + col_dir * (w - 1)
        col_dir = -col_dir
        stored = stored[:, ::-1]
    if transpose:
        col_dir, row_dir = row_dir, col_dir
        stored = stored.T
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = col_dir, row_dir, (3.0, 0.0, 0.0), origin
    assert upright_axes(aff) == (transpose, flip_r, flip_c)
    assert np.array_equal(to_upright(stored, aff), c)
    grid = grid_for((1,) + stored.shape, aff)
    # probabilities on the grid from the upright class map: one-hot, resampled exactly
    rows, cols = np.mgrid[0:grid.shape[0], 0:grid.shape[1]]
    xyz = grid.pixel_to_patient(rows, cols, np.zeros(rows.size))
    vox = np.linalg.solve(aff[:3, :3], (xyz - aff[:3, 3]).T).T
    sr, sc = np.rint(vox[:, 1]).astype(int), np.rint(vox[:, 0]).astype(int)
    inside = (sr >= 0) & (sr < stored.shape[0]) & (sc >= 0) & (sc < stored.shape[1])
    cls = np.zeros(rows.size, int)
    cls[inside] = stored[sr[inside], sc[inside]]
    probs = np.eye(len(CLASSES), dtype=np.float32)[cls].T.reshape(1, len(CLASSES), *grid.shape)
    seg = SagittalSegmentation(probs, [0], grid)
    up_pts = {k: v for k, v in pts.items()}
    src_pts = from_upright_points(list(up_pts.values()), stored.shape, aff)
    vox_pts = {k: (cc, rr, 0.0) for k, (rr, cc) in zip(up_pts, src_pts)}
    labels = source_labels(seg, 0, stored.shape, aff, vox_pts)
    expected = label_levels(c, pts, (1.0, 1.0))
    assert np.array_equal(to_upright(labels, aff), expected)


def test_partial_label_loss_counts_only_what_is_known():
    logits = torch.zeros(1, len(CLASSES), 2, 2, requires_grad=True)
    full = torch.full((1, 2, 2), 1 << BODY, dtype=torch.uint8)
    loss = partial_label_loss(logits, full, dice_weight=0.0)
    assert loss.item() == pytest.approx(np.log(len(CLASSES)), rel=1e-5)  # uniform: plain cross-entropy
    anything = torch.full((1, 2, 2), ALL, dtype=torch.uint8)
    assert partial_label_loss(logits, anything).item() == pytest.approx(0.0, abs=1e-6)
    not_body = torch.full((1, 2, 2), ALL & ~(1 << BODY), dtype=torch.uint8)
    partial_label_loss(logits, not_body, dice_weight=0.0).backward()
    g = logits.grad[0, :, 0, 0]
    assert g[BODY] > 0 and all(g[k] < 0 for k in range(len(CLASSES)) if k != BODY)  # only the body is pushed down


def test_spider_masks_become_levels_counted_up_from_l5_s1():
    """Synthetic SPIDER-style mask: vertebrae (bodies + posterior elements) 1, discs 2, canal 3."""
    m = np.zeros((200, 120), np.uint8)
    for i in range(4):
        r0 = 10 + i * 45
        m[r0:r0 + 30, 20:60] = 1  # body
        m[r0 + 5:r0 + 25, 90:110] = 1  # posterior element, behind the canal
        m[r0 + 30:r0 + 40, 22:58] = 2
    m[0:200, 70:80] = 3
    sl = spider_slice(np.ones(m.shape, np.float32), m, (1.0, 1.0))
    assert sl.levels[25, 40] == VERTEBRA_LABELS["L2"] and sl.levels[150, 40] == VERTEBRA_LABELS["L5"]
    assert sl.levels[180, 40] == disc_label("L5-S1") and sl.levels[45, 40] == disc_label("L2-L3")
    assert sl.classes[20, 100] == 0  # posterior elements are not bodies
    assert sl.allowed[195, 10] == (1 | (1 << BODY))  # below L5-S1 the sacrum is unmasked: bone or background
    x, bits = make_sample(sl, np.random.default_rng(0))
    assert x.shape[0] == 1 and x.shape[1:] == bits.shape


@pytest.mark.slow
def test_tiny_training_package_and_evaluation(tmp_path: Path):
    """A few steps on a synthetic levels.json folder: the package loads, evaluation writes its report."""
    import nibabel as nib

    from training.segmentation import load_levels_volumes
    from training.segmentation_eval import evaluate_segmentation

    rng = np.random.default_rng(0)
    img = rng.normal(40, 5, (160, 80, 40)).clip(0)
    lab = np.zeros(img.shape, np.uint8)
    verts = {}
    for i, name in enumerate(("L1", "L2", "L3", "L4", "L5")):
        r0 = 12 + i * 28
        img[r0:r0 + 20, 20:50, 10:30] = 180
        lab[r0:r0 + 20, 20:50, 10:30] = VERTEBRA_LABELS[name]
        verts[name] = {"centroid": {"vox": [r0 + 10.0, 35.0, 20.0]}}
    aff = np.array([[0, 0, -1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(img.astype(np.uint8), aff), tmp_path / "SYN-01.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "SYN-01_labels.nii.gz")
    cases = {"cases": {"SYN-01": {"image": "SYN-01.nii.gz", "labels": "SYN-01_labels.nii.gz",
                                   "affine": aff.tolist(), "vertebrae": verts, "discs": {}}}}
    (tmp_path / "levels.json").write_text(json.dumps(cases))
    data = load_levels_volumes(tmp_path, half_width=3)
    assert len(data) == 1 and data[0].structures == ("vertebral body",)
    net = train_net(data, steps=3, batch=2)
    pkg = save_package(net, tmp_path / "pkg", {"data": {"lumbar-mri-levels": 1}}, {})
    seg = SpineSegmenter.from_package(pkg)
    assert seg.predict(np.zeros((1, 1, 32, 32), np.float32)).shape == (1, len(CLASSES), 32, 32)
    out = tmp_path / "report"
    m = evaluate_segmentation(tmp_path, out, package=pkg, levels="reference")
    assert m["n_cases"] == 1 and "dice_body" in m
    pred = nib.load(out / "cases" / "SYN-01_pred_labels.nii.gz")
    assert pred.shape == img.shape and np.allclose(pred.affine, aff)
    with open(out / "measurements.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["case", "level", "measurement", "unit", "predicted", "reference"]
    assert any(r["measurement"] == "middle body height" and r["reference"] for r in rows)
    # another task's package is refused
    cfg = json.loads((pkg / "config.json").read_text())
    cfg["task"] = "levels"
    (pkg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackageError, match="task"):
        SpineSegmenter.from_package(pkg)


def test_new_net_outputs_class_scores():
    net = new_net()
    assert net.output == "logits"
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, len(CLASSES), 32, 32)


@pytest.mark.slow
def test_shipped_segmenter_on_real_spider_masks():
    """The shipped package on three real SPIDER T2 SPACE patients (they were in its training data: a
    smoke check of the product path on real images, not a validation; the card has the cross-validation)."""
    space = DATA / "spider-space"
    if not (space / "cases.json").is_file():
        pytest.skip("real data absent: ../shared/data/spider-space (see its README)")
    from training.segmentation import dice_scores, load_spider_space, predict_case
    from training.segmentation_eval import default_package

    if not (default_package() / "config.json").is_file():
        pytest.skip("no shipped spine_segmentation package")
    seg = SpineSegmenter.from_package(default_package())
    meta = json.loads((space / "cases.json").read_text())
    keep = sorted(meta)[:3]
    sub = {k: meta[k] for k in keep}
    for case in load_spider_space_subset(space, sub, load_spider_space):
        d = dice_scores(case, predict_case(seg, case))
        assert d["vertebral body"] > 0.8 and d["disc"] > 0.7 and d["spinal canal"] > 0.6, (case.name, d)


def load_spider_space_subset(space: Path, sub: dict, loader) -> list:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "cases.json").write_text(json.dumps(sub))
        for k in sub:
            (t / k).symlink_to((space / k).resolve())
        return loader(t)
