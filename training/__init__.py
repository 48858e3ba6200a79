"""Training, cross-validation, metrics, plots, model cards and package export."""
