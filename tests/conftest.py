import os

# The Triton interpreter must be switched on before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grass_kernels import _backend  # noqa: E402

torch.set_num_threads(2)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The tolerance rule. Every kernel accumulates in fp32, and the reference computes in fp32 from
# the same (already rounded) 16-bit inputs, so kernel and reference differ only by the order of
# fp32 additions: relative error ~1e-7 * sqrt(terms per output), far below 1e-5 at the tested
# sizes, whatever the input dtype. A missing term of an output (one bucket, one token, one
# column) moves the result by far more than that.
FP32_RTOL = 1e-5
RTOL = {dtype: FP32_RTOL for dtype in DTYPES}

# Unit roundoff (half an ulp at 1) of the formats a kernel may multiply in.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, "tf32": 2.0**-11}


def tensor_core_rtol(op: str, dtype: torch.dtype) -> float:
    """Bound for the compiled Triton kernels on a GPU with 16-bit inputs (``_launch.native_dot``).

    There the kernels multiply on tensor cores: logra rounds its fp32 projections to the
    input's 16-bit dtype (u_dtype per product) and forms the outer products of the projected
    tiles in TF32 (u_tf32); fact_sjlt forms its outer products in TF32 (the +-1 sign tiles are
    exact); fact_grass rounds a float token mask times the gradient to 16 bits (u_dtype), its
    products of 16-bit inputs being exact in fp32. Each rounding perturbs one factor of every
    product by at most u; over many products of random sign these errors add in quadrature
    like the products themselves, so the relative error of an output is about the sum of the
    roundoffs involved. The bound is twice that sum.
    """
    u_16, u_tf32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF["tf32"]
    return 2 * {"logra": u_16 + u_tf32, "fact_sjlt": u_tf32, "fact_grass": u_16}[op]


def rtol(op: str, dtype: torch.dtype, device, backend: str | None) -> float:
    """The bound for ``op`` on ``dtype`` inputs run by ``backend`` on ``device`` (see above):
    FP32_RTOL everywhere except the compiled Triton factorized kernels on 16-bit inputs."""
    compiled_triton = (
        backend == "triton"
        and torch.device(device).type == "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
    )
    if compiled_triton and dtype in (torch.bfloat16, torch.float16) and op in (
        "logra", "fact_sjlt", "fact_grass"
    ):
        return tensor_core_rtol(op, dtype)
    return FP32_RTOL


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
