"""DICOM in and out for Discus: networking, spool, headers, volumes, SR and SC encoders.

This package never imports torch or Celery. Submodules are imported explicitly
(``from dicom_io.results import StudyResult``) so that light users stay light.
"""
