"""The dciodvfy / dsrdump wrappers report problems instead of hiding them."""

from __future__ import annotations

import shutil

import pytest

from dicom_io.errors import ValidationToolError
from dicom_io.validate import dciodvfy, dsrdump
from tests.sr_sources import make_source

pytestmark = pytest.mark.skipif(
    not (shutil.which("dciodvfy") and shutil.which("dsrdump")),
    reason="dicom3tools dciodvfy and DCMTK dsrdump are needed",
)


def test_dciodvfy_finds_errors_in_a_broken_image(tmp_path):
    ds = make_source(0)
    good = dciodvfy(ds)
    assert good.iod == "MRImage" and good.ok, good.errors
    del ds.Rows  # type 1 in Image Pixel
    bad = dciodvfy(ds)
    assert not bad.ok and any("Rows" in e for e in bad.errors)
    path = tmp_path / "x.dcm"
    make_source(1).save_as(path, enforce_file_format=True)
    assert dciodvfy(path).ok
    with pytest.raises(ValueError, match="path_or_ds"):
        dciodvfy(tmp_path / "missing.dcm")


def test_dsrdump_refuses_a_non_sr():
    with pytest.raises(ValidationToolError, match="dsrdump"):
        dsrdump(make_source(0))
