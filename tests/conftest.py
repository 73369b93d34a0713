import os

# The Triton interpreter must be switched on before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error bounds (Frobenius) against the fp32 reference, by input dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def backends_for(device: str) -> list[str]:
    """Kernel backends to test on this machine: the native kernels and Triton."""
    if device == "cuda":
        return ["cuda", "triton"]
    return ["cpu", "triton"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
