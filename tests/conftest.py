"""Shared test setup: the Triton interpreter switched on for the CPU, the dtypes and devices the
kernel tests run, the kernel backends present per device, a relative-error helper and a skip
for tests that need much free memory. The kernel tests' shapes, random inputs, oracles and
tolerance rule are in sweep.py."""

import os

# The Triton interpreter must be switched on before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grass_kernels import _backend  # noqa: E402

torch.set_num_threads(2)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def require_free_memory(gib: float) -> None:
    """Skip the calling test, with the reason, unless the machine has ``gib`` GiB available."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        pytest.skip(f"needs {gib} GiB of free memory and cannot read /proc/meminfo")
    if available < gib:
        pytest.skip(f"needs {gib} GiB of free memory; {available:.1f} GiB available")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def backends_for(device: str, op: str | None = None) -> list[str]:
    """Kernel backends to test for ``op`` on ``device``: the native kernel (where one exists for
    that device) and Triton."""
    if device == "cuda":
        return (["cuda"] if op not in _backend.NO_CUDA_KERNEL else []) + ["triton"]
    return ["cpu", "triton"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
