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


def test_real_mri_gets_no_finding_from_a_synthetic_only_package(tmp_path: Path) -> None:
    nifti = LEVELS_DATA / "VB3-04.nii.gz"
    if not nifti.exists():
        pytest.skip(f"real level data not found at {LEVELS_DATA} (the shared data set lumbar-mri-levels)")
    from dicom_io.writer import write_nifti_as_series

    study = tmp_path / "study"
    write_nifti_as_series(nifti, study)
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
