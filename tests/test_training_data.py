"""Training data sources (RSNA 2024 layout, manifests, synthetic phantoms), folds and metrics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from training.cv import make_folds
from training.datasets import CropSet
from training.errors import DataError
from training.metrics import classification_metrics, summarize_folds, weighted_log_loss
from training.sources import load_manifest, load_rsna
from training.synthetic import synthetic_crops


def write_dicom(path: Path, pixels: np.ndarray, spacing: float = 0.5, slope: float = 1.0, intercept: float = 0.0) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [spacing, spacing]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def make_rsna(root: Path) -> None:
    """Two studies, foraminal narrowing labelled at L4/L5 on both sides, one bright marker per coordinate."""
    grades = {"1": ("Normal/Mild", "Severe"), "2": ("Moderate", "")}  # study 2: right side unlabelled
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "left_neural_foraminal_narrowing_l4_l5", "right_neural_foraminal_narrowing_l4_l5"])
        for s, (left, right) in grades.items():
            w.writerow([s, left, right])
    with open(root / "train_series_descriptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "series_id", "series_description"])
        for s in grades:
            w.writerow([s, "10", "Sagittal T1"])
    with open(root / "train_label_coordinates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
        for s in grades:
            w.writerow([s, "10", "3", "Left Neural Foraminal Narrowing", "L4/L5", "60", "50"])
            w.writerow([s, "10", "7", "Right Neural Foraminal Narrowing", "L4/L5", "60", "50"])
            w.writerow([s, "10", "3", "Spinal Canal Stenosis", "L4/L5", "10", "10"])  # another task
    for s in grades:
        for inst in (3, 7):
            img = np.full((100, 120), 100, np.uint16)
            img[45:55, 60:66] = 1000  # marker right of the coordinate's column
            write_dicom(root / "train_images" / s / "10" / f"{inst}.dcm", img)


def test_rsna_layout(tmp_path: Path) -> None:
    make_rsna(tmp_path)
    crops = load_rsna(tmp_path, "mr_foramen", crop_px=32)
    assert crops.class_names == ["normal_mild", "moderate", "severe"]
    assert list(crops.labels) == [0, 2, 1]  # the unlabelled right side of study 2 is skipped
    assert list(crops.groups) == ["1", "1", "2"]
    assert crops.images.shape == (3, 32, 32)
    left, right = crops.images[0], crops.images[1]
    # 48 mm at 0.5 mm/px is 96 px around the point: the marker sits just right of the centre,
    # and the right side is mirrored so it sits just left of the centre
    assert left[14:18, 16:18].mean() > left[14:18, 13:15].mean() + 200
    assert right[14:18, 14:16].mean() > right[14:18, 17:19].mean() + 200
    with pytest.raises(DataError, match="mr_disc"):
        load_rsna(tmp_path, "mr_disc")
    with pytest.raises(DataError, match="missing"):
        load_rsna(tmp_path / "nowhere", "mr_canal")


def test_manifest_folder_and_csv(tmp_path: Path) -> None:
    for i, c in enumerate(["normal", "scoliosis", "spondylolisthesis"]):
        (tmp_path / "f" / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((40, 30), 50 * (i + 1), np.uint8)).save(tmp_path / "f" / c / f"p{i}{k}.png")
    crops = load_manifest(tmp_path / "f", "xray", crop_px=16)
    assert crops.images.shape == (6, 16, 16)
    assert sorted(crops.counts().values()) == [2, 2, 2]
    assert np.allclose(crops.images[crops.labels == 2], 150)
    write_dicom(tmp_path / "a.dcm", np.full((20, 20), 100, np.uint16), slope=2.0, intercept=-1024)
    write_dicom(tmp_path / "b.dcm", np.full((20, 20), 600, np.uint16), slope=2.0, intercept=-1024)
    (tmp_path / "m.csv").write_text("path,label,patient\na.dcm,normal,P1\nb.dcm,2,P2\n")
    crops = load_manifest(tmp_path / "m.csv", "ct_disc", crop_px=8)
    assert list(crops.labels) == [0, 2] and list(crops.groups) == ["P1", "P2"]
    assert np.allclose(crops.images[0], 2 * 100 - 1024)  # rescaled to Hounsfield units
    (tmp_path / "bad.csv").write_text("path,label\na.dcm,fracture\n")
    with pytest.raises(DataError, match="fracture"):
        load_manifest(tmp_path / "bad.csv", "ct_disc")
    (tmp_path / "f" / "fracture").mkdir()
    with pytest.raises(DataError, match="fracture"):
        load_manifest(tmp_path / "f", "xray")


def test_synthetic_crops_follow_ground_truth() -> None:
    sets = synthetic_crops(["mr_canal", "xray"], [3, 4], crop_px={"mr_canal": 32, "xray": 48})
    canal, xray = sets["mr_canal"], sets["xray"]
    assert canal.images.shape == (10, 32, 32) and set(canal.groups) == {"seed3", "seed4"}
    assert [m["level"] for m in canal.meta[:5]] == ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    assert xray.images.shape == (4, 48, 48) and [m["view"] for m in xray.meta] == ["AP", "LAT", "AP", "LAT"]
    for img, lab, m in zip(xray.images, xray.labels, xray.meta):
        # a finding counts only on the view that shows it
        assert xray.class_names[lab] in ("normal", m["study_label"])
    # same seeds, same crops
    again = synthetic_crops(["mr_canal"], [3], crop_px={"mr_canal": 32})["mr_canal"]
    np.testing.assert_array_equal(again.images, canal.images[:5])


def test_crop_cache_is_keyed_by_the_phantom_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.synthetic as syn
    from dicom_io import phantom

    made = []

    def fake(tasks, seeds, **kw):
        made.append(list(seeds))
        return {t: CropSet(np.zeros((1, 8, 8)), [0], ["seed0"], ["a", "b", "c"], [{}]) for t in tasks}

    monkeypatch.setattr(syn, "synthetic_crops", fake)
    syn.cached_synthetic_crops(tmp_path, ["mr_disc"], range(2))
    syn.cached_synthetic_crops(tmp_path, ["mr_disc"], range(2))
    assert len(made) == 1  # served from the cache
    monkeypatch.setattr(phantom, "PHANTOM_VERSION", phantom.PHANTOM_VERSION + 1)
    syn.cached_synthetic_crops(tmp_path, ["mr_disc"], range(2))
    assert len(made) == 2  # a changed phantom renders again


def test_crop_set_save_load_subset(tmp_path: Path) -> None:
    s = CropSet(np.zeros((4, 8, 8)), [0, 1, 2, 1], ["a", "a", "b", "c"], ["x", "y", "z"], [{"i": i} for i in range(4)])
    s.save(tmp_path / "s.npz")
    t = CropSet.load(tmp_path / "s.npz")
    assert t.counts() == {"x": 1, "y": 2, "z": 1} and t.meta[3] == {"i": 3}
    assert len(t.subset(t.labels == 1)) == 2
    with pytest.raises(DataError, match="labels"):
        CropSet(np.zeros((2, 8, 8)), [0, 3], ["a", "b"], ["x", "y"])


def test_folds_are_grouped_and_stratified() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)
    labels = rng.integers(0, 3, len(groups))
    s = CropSet(np.zeros((len(groups), 2, 2)), labels, groups, ["a", "b", "c"])
    folds = make_folds(s, 5, seed=1)
    assert len(folds) == 5
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen) == list(range(len(groups)))
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])
        for c in range(3):  # every class in every validation fold
            assert (labels[va] == c).sum() > 0
    single = make_folds(s, 1)
    assert len(single) == 1 and 0.1 < len(single[0][1]) / len(groups) < 0.3
    with pytest.raises(DataError, match="patients"):
        make_folds(s.subset(np.arange(10)), 5)


def test_metrics_by_hand() -> None:
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    m = classification_metrics(y, p, ["normal_mild", "moderate", "severe"])
    assert m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m["per_class"]["severe"]["recall"] == 0.5 and m["per_class"]["normal_mild"]["precision"] == 0.5
    assert math.isclose(m["macro_recall"], (1 + 1 + 0.5) / 3)
    expected = -(1 * math.log(0.8) + 2 * math.log(0.6) + 4 * math.log(0.7) + 4 * math.log(0.2)) / 11
    assert math.isclose(m["rsna_weighted_log_loss"], expected)
    assert math.isclose(weighted_log_loss(y, p * 3), expected)  # rows are renormalised
    assert m["per_class"]["normal_mild"]["auc"] == 1.0
    assert m["per_class"]["severe"]["auc"] == pytest.approx(0.875)  # one tie counts half
    s = summarize_folds([{"accuracy": 0.5}, {"accuracy": 0.7}])
    assert s["accuracy"]["mean"] == pytest.approx(0.6) and s["accuracy"]["sd"] == pytest.approx(0.1414, abs=1e-3)
    one_class = classification_metrics([0, 0], np.array([[0.9, 0.05, 0.05]] * 2), ["a", "b", "c"])
    assert math.isnan(one_class["per_class"]["a"]["auc"])
