"""grass: training-data attribution with compressed per-sample gradients."""
