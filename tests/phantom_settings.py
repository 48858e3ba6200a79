"""Analysis settings for runs on synthetic phantoms.

A site's default withholds analyses whose package was trained on synthetic data
only; on phantoms, where those packages were validated, the tests let them report.
"""


class PhantomSettings:
    """Settings object for ``analyze_study(..., settings=PHANTOMS)``."""

    report_synthetic_models = True


PHANTOMS = PhantomSettings()
