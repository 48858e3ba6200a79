"""Everything Discus writes for one analysis, in one call (SR + SC images).

The worker's entry point; the encoders themselves live in :mod:`dicom_io.sr` and
:mod:`dicom_io.sc`.
"""

from __future__ import annotations

from dicom_io.sc import encode_all

__all__ = ["encode_all"]
