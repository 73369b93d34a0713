"""The embedded digits benchmark, apart from the attribution pipeline: scikit-learn's digits
and a small MLP (``digits``), the retraining that gives the LDS its ground truth (``retrain``),
and the study behind ``grass demo`` / ``grass damping`` (``study``)."""
