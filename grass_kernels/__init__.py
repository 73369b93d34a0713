"""grass_kernels: fused kernels for compressed per-sample gradients (GraSS / FactGraSS).

Tensors in, tensors out. Flat compressors act on rows of (N, D); factorized ones read a linear
layer's inputs and output gradients and never form the per-example gradient; ``linear_grads``
forms it (whole, or a block of examples at a time) for the flat ones. The table makers
(``sjlt_codes``, ``random_indices``, ``gaussian_matrix``) take (d, k) for a map from d inputs to
k outputs, and ``seed=`` / ``device=`` as keywords.
"""

from ._backend import backends
from ._tables import gaussian_matrix, random_indices, sjlt_codes
from .factorized import fact_grass, fact_sjlt, logra
from .flat import gaussian, grass, mask, sjlt, sjlt_transpose
from .linear import linear_grads

__all__ = [
    "backends",
    "fact_grass",
    "fact_sjlt",
    "gaussian",
    "gaussian_matrix",
    "grass",
    "linear_grads",
    "logra",
    "mask",
    "random_indices",
    "sjlt",
    "sjlt_codes",
    "sjlt_transpose",
]
__version__ = "0.1.0"
