"""grass_kernels: fused kernels for compressed per-sample gradients (GraSS / FactGraSS).

Tensors in, tensors out. Flat compressors act on rows of (N, D); factorized ones read a linear
layer's inputs and output gradients and never form the per-example gradient.
"""

from ._backend import backends
from ._tables import gaussian_matrix, sjlt_codes
from .factorized import fact_grass, fact_sjlt, logra
from .flat import gaussian, grass, mask, random_indices, sjlt, sjlt_transpose

__all__ = [
    "backends",
    "fact_grass",
    "fact_sjlt",
    "gaussian",
    "gaussian_matrix",
    "grass",
    "logra",
    "mask",
    "random_indices",
    "sjlt",
    "sjlt_codes",
    "sjlt_transpose",
]
__version__ = "0.1.0"
