"""grass: training-data attribution with compressed per-sample gradients (GraSS / FactGraSS).

    attr = grass.Attributor(model, loss_fn, compressor=grass.FactGraSS(k=4096))
    attr.cache(train_data)
    scores = attr.attribute(test_data)     # (n_test, n_train)

Kernels come from ``grass_kernels``; this package knows models, data and disk.
"""

from .attributor import Attributor, Features
from .compressors import (
    SJLT,
    Compressor,
    FactGraSS,
    FactSJLT,
    Gaussian,
    GraSS,
    Identity,
    LoGra,
    RandomMask,
    SelectiveMask,
)
from . import hf, tasks
from .ensemble import Ensemble
from .lds import lds
from .store import GradientStore

__all__ = [
    "SJLT",
    "Attributor",
    "Compressor",
    "Ensemble",
    "FactGraSS",
    "FactSJLT",
    "Features",
    "Gaussian",
    "GradientStore",
    "GraSS",
    "Identity",
    "LoGra",
    "RandomMask",
    "SelectiveMask",
    "hf",
    "lds",
    "tasks",
]
