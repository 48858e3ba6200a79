"""Calibrated probabilities and the input-domain check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.calibration import calibration_summary, expected_calibration_error, fit_temperature, softmax
from models.config import ModelConfig
from models.domain import FeatureDomain, penultimate_features
from models.predictor import Predictor
from models.registry import create_model


def _overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right 70% of the time but says 99%."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + rng.integers(1, 3, n)) % 3)
    logits = np.zeros((n, 3))
    logits[np.arange(n), pred] = 6.0
    return logits, y


def test_temperature_scaling_repairs_overconfidence() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t > 2.0  # softened
    before = expected_calibration_error(softmax(logits), y)
    after = expected_calibration_error(softmax(logits, t), y)
    assert before > 0.25 and after < 0.03
    # the ranking, and so every predicted class, is unchanged
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()
    s = calibration_summary(logits, y)
    assert s["ece_after"] < s["ece_before"] and s["nll_after"] <= s["nll_before"]


def test_fit_temperature_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1, 2]))


def test_domain_flags_far_inputs_and_keeps_its_own(tmp_path) -> None:
    rng = np.random.default_rng(1)
    ref, held = rng.normal(size=(400, 16)), rng.normal(size=(200, 16))
    dom = FeatureDomain.fit(ref, held, percentile=99.0)
    assert dom.outside(held).mean() <= 0.02
    assert dom.outside(rng.normal(size=(100, 16)) + 4.0).all()
    back = FeatureDomain.load(dom.save(tmp_path))
    np.testing.assert_allclose(back.distance(held), dom.distance(held), rtol=1e-4)
    assert back.threshold == pytest.approx(dom.threshold)


def test_predictor_applies_temperature_and_reports_distances() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_chans=1, channels=(8, 8, 16, 16), stem_width=8).eval()
    cfg = ModelConfig(name="t", architecture="resnet18", task="mr_canal", version="0", input_size=(32, 32),
                      in_chans=1, class_names=["normal/mild", "moderate", "severe"],
                      preprocessing={"mode": "percentile", "low": 0.5, "high": 99.5, "mean": 0.5, "std": 0.25},
                      model_kwargs={"channels": [8, 8, 16, 16], "stem_width": 8})
    rng = np.random.default_rng(0)
    crops = rng.normal(size=(24, 32, 32)).astype(np.float32)
    with torch.no_grad():
        feats, _ = penultimate_features(model, Predictor(model, cfg).preprocess(crops))
    dom = FeatureDomain.fit(feats.numpy()[:16], feats.numpy()[16:])
    plain = Predictor(model, cfg, domain=dom)
    hot = Predictor(model, ModelConfig(**{**cfg.to_dict(), "calibration": {"temperature": 4.0}}), domain=dom)
    p1, d1 = plain.assess(crops)
    p4, d4 = hot.assess(crops)
    assert d1 is not None and d1.shape == (24,)
    np.testing.assert_allclose(d1, d4, rtol=1e-4)
    assert (p4.max(1) <= p1.max(1) + 1e-6).all()  # a higher temperature never sharpens
    assert (p4.argmax(1) == p1.argmax(1)).all()


def test_a_ct_crop_fed_to_an_mr_package_is_refused() -> None:
    """The shipped axial MR disc model refuses CT crops: no finding, a warning with the distance."""
    phantom = pytest.importorskip("dicom_io.phantom", reason="the phantom writer is not installed")
    from dicom_io.results import ConditionValues, StudyResult
    from dicom_io.volume import Volume
    from models.package import SHIPPED_DIR
    from worker.analysis import AnalysisOptions, Run, classify, crop_job
    from worker.model_packages import ModelPackages

    mr_disc = Predictor.from_package(SHIPPED_DIR / "mr_disc", device="cpu")
    assert mr_disc.domain is not None
    anat = phantom.make_anatomy(11)
    ct = phantom.render_ct(anat)
    vol = Volume(np.asarray(ct.array, np.float32), np.asarray(ct.affine, float),
                 [f"1.2.3.{i + 1}" for i in range(ct.array.shape[0])])
    levels = anat.levels_mm()
    jobs = [crop_job("mr_disc", lv, None, [vol], np.asarray(levels[lv], float), 64, 10.0)[0]
            for lv in ("L3-L4", "L4-L5", "L5-S1")]
    _, dist = mr_disc.assess(np.stack([j.crop for j in jobs]))
    assert (dist > 1.5 * mr_disc.domain.threshold).all(), (dist, mr_disc.domain.threshold)  # far, not marginal
    run = Run(StudyResult("1.2.3", 1), ModelPackages.from_loaded({"mr_disc": mr_disc}),
              AnalysisOptions(report_synthetic_models=True))
    assert classify(run, jobs, ConditionValues.DISC) == []
    withheld = [w for w in run.result.warnings if "finding withheld" in w]
    assert len(withheld) == 3 and all("feature distance" in w for w in withheld)
