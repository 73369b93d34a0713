"""Triton kernels for every grass_kernels op, registered as ``torch.ops.grass_triton.<op>``.

Each op is a ``torch.library.triton_op`` whose launcher starts its kernel through
``wrap_triton``, so torch.compile can trace into the kernels; the signatures are exactly those
of ``grass_kernels.reference``. One kernel per module, the launcher beside it; ``_tiles`` holds
the device-side pieces they share and ``_launch`` the host-side ones.

On CPU tensors the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 before
import), which is how the tests run them.
"""

from __future__ import annotations

import torch

from . import fact_grass, fact_sjlt, grass, logra, sjlt, sjlt_transpose  # noqa: F401  (register)


def ops():
    """``torch.ops.grass_triton``: the namespace holding the registered Triton ops, one per name
    in ``grass_kernels._backend.OPS``."""
    return torch.ops.grass_triton
