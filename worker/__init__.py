"""The Discus daemon: settings, listener wiring, monitor, Celery tasks, pipeline, export, CLI."""

__version__ = "0.1.0"
