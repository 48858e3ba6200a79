"""A real patient's MRI with a site's default settings: nothing from a model that never saw a patient."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_io.results import StatusValues
from dicom_io.sr import read_sr
from tests.conftest import SHARED_DATA
from worker.analysis import SYNTHETIC_ONLY_REASON
from worker.model_packages import ModelPackages
from worker.pipeline import analyze_study, encode_outputs

LEVELS_DATA = SHARED_DATA / "lumbar-mri-levels"

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    nifti = LEVELS_DATA / "VB3-04.nii.gz"
    if not nifti.exists():
        pytest.skip(f"real level data not found at {LEVELS_DATA} (the shared data set lumbar-mri-levels)")
    from dicom_io.writer import write_nifti_as_series

    folder = tmp_path_factory.mktemp("real") / "study"
    write_nifti_as_series(nifti, folder)
    return folder


def test_real_mri_gets_no_finding_from_a_synthetic_only_package(study: Path, tmp_path: Path) -> None:
    packages = ModelPackages.shared()
    res = analyze_study(study, 1, packages=packages)  # default settings: report_synthetic_models false
    assert res.status is StatusValues.ANALYSED, res.reason
    synthetic = {t for t in packages.loaded if packages.synthetic_only(t)}
    assert "mr_canal" in synthetic  # the shipped canal model learned from phantoms only
    reported = {m.task for m in res.models}
    assert not reported & synthetic, reported
    assert res.not_run["mr_canal"] == SYNTHETIC_ONLY_REASON
    bad = [f for f in res.findings if f.model in {packages.configs[t].name for t in synthetic}]
    assert not bad
    # the SR says which analyses were withheld and why
    out = tmp_path / "out"
    written = [pydicom.dcmread(p) for p in encode_outputs(res, study, out)]
    srs = [ds for ds in written if ds.Modality == "SR"]
    assert len(srs) == 1
    text = str([item.TextValue for item in _texts(srs[0])])
    assert f"Not reported: mr_canal: {SYNTHETIC_ONLY_REASON}" in text
    assert len(read_sr(srs[0])) == len(res.findings)


def _texts(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in getattr(ds, "ContentSequence", []):
        if getattr(item, "ValueType", "") == "TEXT":
            out.append(item)
        out += _texts(item)
    return out


def test_disc_grading_below_its_targets_is_withheld_unless_allowed(study: Path, tmp_path: Path) -> None:
    from dicom_io.results import GRADES, ConditionValues
    from dicom_io.validate import dciodvfy
    from worker.analysis import BELOW_TARGET_REASON
    from worker.analysis_mr import DISC_GRADING

    packages = ModelPackages.shared()
    if packages.get(DISC_GRADING) is None:
        pytest.skip(f"no {DISC_GRADING} package installed")
    assert packages.below_target(DISC_GRADING)  # its card: below the bar
    res = analyze_study(study, 1, packages=packages)
    assert res.not_run[DISC_GRADING].startswith(BELOW_TARGET_REASON)

    class Evaluating:  # a site evaluating the grader
        report_below_target_models = True

    res = analyze_study(study, 1, packages=packages, settings=Evaluating())
    graded = {f.level for f in res.findings if f.condition is ConditionValues.PFIRRMANN}
    withheld = [w for w in res.warnings if "disc grading: findings withheld" in w]
    assert graded or withheld, (res.not_run, res.warnings)
    for level in graded:  # every head of the grader, once per graded disc
        mine = [f for f in res.findings if f.level == level and f.model.startswith("discus-mr-disc-grading")]
        assert {f.condition for f in mine} == {
            ConditionValues.DISC, ConditionValues.PFIRRMANN, ConditionValues.DISC_NARROWING,
            ConditionValues.SPONDYLOLISTHESIS, ConditionValues.MODIC, ConditionValues.UPPER_ENDPLATE,
            ConditionValues.LOWER_ENDPLATE}
        for f in mine:
            assert f.calibrated and abs(sum(f.probabilities.values()) - 1.0) < 1e-6
            assert (f.heatmap is not None) == (GRADES[f.condition].index(f.grade) > 0
                                               and f.condition is not ConditionValues.PFIRRMANN)
    written = [pydicom.dcmread(p) for p in encode_outputs(res, study, tmp_path / "out")]
    sr = next(ds for ds in written if ds.Modality == "SR")
    assert len(read_sr(sr)) == len(res.findings)
    for ds in written[:3]:
        report = dciodvfy(ds)
        assert report.ok, report.errors
