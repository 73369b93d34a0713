"""The riskiest launch paths of the GPU kernels, through the public ops, against the reference.

Each case forces a path that small shapes never reach: dynamic shared memory above 48 KB,
16-byte vector loads over large inputs, more than 2**31 elements, mixed input dtypes, many
output tiles and token splits, strided inputs read in place, fractional token masks with the
bias column at a ragged tile edge. sjlt, grass and fact_grass run with backend="cuda";
fact_sjlt with backend=None, which picks its GPU kernel (Triton). All need a CUDA device.

Tolerance: the kernels and the reference both accumulate in fp32 from the same (rounded)
inputs, so they differ only by the order of fp32 additions. For a sum of n terms of random sign
that difference is about u * sqrt(n) relative (u = 2**-24); ``tolerance(n)`` allows 4x that,
and never less than 1e-5. The one exception: Triton's fact_sjlt multiplies the sketches of
16-bit inputs in TF32 (10-bit mantissa, 2**-11 relative per operand, two operands per
product), so it is held to TF32_BOUND = 3 * 2**-10 there.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import grass_kernels as gk
from conftest import rel_err
from grass_kernels import reference
from sweep import random_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

UNIT_ROUNDOFF = 2.0**-24
TF32_BOUND = 3 * 2.0**-10


def tolerance(terms: float) -> float:
    """Relative-error bound for fp32 sums of ``terms`` addends in two different orders."""
    return max(1e-5, 4 * UNIT_ROUNDOFF * math.sqrt(terms))


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def need_memory(nbytes: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        reason = f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free"
        print(f"skipping: {reason}")
        pytest.skip(reason)


def check_sjlt(x: torch.Tensor, k: int, c: int) -> None:
    out = gk.sjlt(x, k, c=c, seed=3, backend="cuda")
    ref = gk.sjlt(x, k, c=c, seed=3, backend="reference")
    err = rel_err(out, ref)
    assert err < tolerance(x.shape[1] * c / k), (tuple(x.shape), x.dtype, k, c, err)


def check_grass(x: torch.Tensor, k: int, kp: int, c: int) -> None:
    idx = gk.random_indices(x.shape[1], kp, seed=5).cuda()
    out = gk.grass(x, k, indices=idx, c=c, seed=4, backend="cuda")
    ref = gk.grass(x, k, indices=idx, c=c, seed=4, backend="reference")
    err = rel_err(out, ref)
    assert err < tolerance(kp * c / k), (tuple(x.shape), x.dtype, k, kp, c, err)


def fact_grass_case(acts, grads, k, ki, ko, *, c=1, bias=False, mask=None, in_idx=None):
    d_in, d_out = acts.shape[-1] + int(bias), grads.shape[-1]
    if in_idx is None:
        in_idx = gk.random_indices(d_in, ki, seed=1).cuda()
    out_idx = gk.random_indices(d_out, ko, seed=2).cuda()
    kwargs = dict(in_indices=in_idx, out_indices=out_idx, c=c, seed=6, bias=bias,
                  token_mask=mask)
    out = gk.fact_grass(acts, grads, k=k, backend="cuda", **kwargs)
    ref = gk.fact_grass(acts, grads, k=k, backend="reference", **kwargs)
    tokens = acts.shape[1] if acts.dim() == 3 else 1
    err = rel_err(out, ref)
    bound = tolerance(tokens * in_idx.numel() * ko * c / k)
    assert err < bound, (tuple(acts.shape), acts.dtype, grads.dtype, k, err, bound)


def fact_sjlt_case(acts, grads, k_in, k_out, *, c=1, bias=False, mask=None):
    kwargs = dict(k_in=k_in, k_out=k_out, c=c, bias=bias, token_mask=mask, path="factorized")
    out = gk.fact_sjlt(acts, grads, **kwargs)
    ref = gk.fact_sjlt(acts, grads, backend="reference", **kwargs)
    d = max(acts.shape[-1], grads.shape[-1])
    err = rel_err(out, ref)
    bound = tolerance(acts.shape[1] * d * c / min(k_in, k_out))
    if {acts.dtype, grads.dtype} != {torch.float32}:
        bound = max(bound, TF32_BOUND)  # a 16-bit input: sketches multiplied in TF32
    assert err < bound, (tuple(acts.shape), acts.dtype, grads.dtype, k_in, k_out, err, bound)


# ----------------------------------------------------------- shared memory above 48 KB

@pytest.mark.parametrize("c", [1, 4])
def test_sjlt_and_grass_four_rows_per_block_at_k_4096(c):
    """N >= 4 rows share a block: 4 * 4096 * 4 bytes = 64 KB of shared k-vectors."""
    x = random_tensor((8, 200_003), torch.bfloat16, "cuda")
    check_sjlt(x, 4096, c)
    check_grass(x, 4096, 4 * 4096, c)


@pytest.mark.parametrize("k", [16384, 32768, 58112])
def test_sjlt_one_row_with_a_large_shared_k_vector(k):
    """N < 4: one row per block with k * 4 bytes of shared memory (64-227 KB)."""
    check_sjlt(random_tensor((3, 300_001), torch.float16, "cuda"), k, 2)


@pytest.mark.parametrize("k", [16384, 32768])
def test_fact_grass_large_shared_k_vector(k):
    acts = random_tensor((2, 64, 512), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((2, 64, 384), torch.bfloat16, "cuda", seed=2)
    fact_grass_case(acts, grads, k, 256, 200, c=2)


def test_fact_grass_k_beyond_shared_memory():
    """k * 4 bytes above the opt-in limit: the scatter goes to global memory."""
    acts = random_tensor((2, 40, 300), torch.float32, "cuda", seed=1)
    grads = random_tensor((2, 40, 200), torch.float32, "cuda", seed=2)
    fact_grass_case(acts, grads, 65536, 256, 160, c=2)


# ----------------------------------------------------------- vector loads on large inputs

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sjlt_vector_loads_at_d_1e7(dtype):
    check_sjlt(random_tensor((4, 10_000_000), dtype, "cuda"), 4096, 4)


@pytest.mark.parametrize("d_in,d_out", [(4096, 14336), (14336, 4096)])
def test_fact_sjlt_at_llama_widths(d_in, d_out):
    acts = random_tensor((2, 64, d_in), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((2, 64, d_out), torch.bfloat16, "cuda", seed=2)
    fact_sjlt_case(acts, grads, 64, 64)


# ----------------------------------------------------------- more than 2**31 elements

def test_sjlt_more_than_2_31_elements():
    """N = 3 rows (one row per block) of D = 8e8: the last row starts past 2**31 elements. The
    table is drawn on the GPU and passed to the op directly: drawing 8e8 codes with the CPU
    generator of the public op would take minutes of the GPU run."""
    n, d, k = 3, 800_000_000, 4096
    need_memory(n * d * (2 + 4 + 4) + d * 4 + 2**30)  # x, the reference's fp32 copies, codes
    x = random_tensor((n, d), torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(11)
    buckets = torch.randint(0, k, (d, 1), generator=g, device="cuda", dtype=torch.int32)
    flip = torch.rand(d, 1, generator=g, device="cuda") < 0.5
    codes = torch.where(flip, ~buckets, buckets)  # bucket b with sign -1 is stored as ~b
    out = torch.ops.grass_kernels.sjlt(x, codes, k)
    err = rel_err(out, reference.sjlt(x, codes, k))
    assert err < tolerance(d / k), err


def test_fact_grass_more_than_2_31_input_elements():
    b, t, d_in, d_out = 4, 8192, 65_600, 64  # B * T * d_in = 2.15e9
    need_memory(b * t * d_in * (2 + 4) + 2**30)  # acts and the reference's fp32 copy
    acts = random_tensor((b, t, d_in), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((b, t, d_out), torch.bfloat16, "cuda", seed=2)
    fact_grass_case(acts, grads, 4096, 128, 64)


def test_fact_sjlt_more_than_2_31_input_elements():
    b, t, d_in, d_out = 4, 8192, 65_600, 64
    need_memory(b * t * d_in * (2 + 4 + 4) + 2**30)
    acts = random_tensor((b, t, d_in), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((b, t, d_out), torch.bfloat16, "cuda", seed=2)
    fact_sjlt_case(acts, grads, 64, 64)


# ----------------------------------------------------------- mixed dtypes

@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_scale", [1.0, 1e-8])
def test_mixed_dtypes_read_each_tensor_in_its_own_dtype(act_dtype, grad_scale):
    """16-bit acts with fp32 grads: gradients near 1e-8 vanish (fp16) or lose bits (bf16) if
    converted to the dtype of acts; the reference reads each in its own dtype."""
    acts = random_tensor((3, 50, 200), act_dtype, "cuda", seed=1)
    grads = random_tensor((3, 50, 150), torch.float32, "cuda", seed=2, scale=grad_scale)
    fact_grass_case(acts, grads, 1024, 130, 140, bias=True)
    fact_sjlt_case(acts, grads, 64, 32, bias=True)
    # The other way round: fp32 acts (a non-contiguous slice) with 16-bit grads.
    fact_grass_case(grads[..., :120], acts, 512, 100, 90)


# ----------------------------------------------------------- tiles and token splits

@pytest.mark.parametrize("k_side", [512, 640])
def test_fact_sjlt_many_output_tiles(k_side):
    acts = random_tensor((2, 300, 1000), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((2, 300, 900), torch.bfloat16, "cuda", seed=2)
    fact_sjlt_case(acts, grads, k_side, k_side, c=2)


def test_fact_grass_one_example_many_token_splits():
    acts = random_tensor((1, 20_000, 256), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((1, 20_000, 300), torch.bfloat16, "cuda", seed=2)
    fact_grass_case(acts, grads, 4096, 128, 128)


# ----------------------------------------------------------- strides, masks, bias

def test_fact_grass_reads_strided_and_transposed_inputs():
    base_acts = random_tensor((40, 3, 2 * 300), torch.bfloat16, "cuda", seed=1)  # (T, B, 2 d_in)
    base_grads = random_tensor((3, 250, 40), torch.float16, "cuda", seed=2)  # (B, d_out, T)
    acts = base_acts.transpose(0, 1)[..., ::2]  # (B, T, d_in), every stride non-unit
    grads = base_grads.transpose(1, 2)  # (B, T, d_out), unit stride over tokens
    assert not acts.is_contiguous() and not grads.is_contiguous()
    fact_grass_case(acts, grads, 2048, 200, 130, c=2, bias=True)
    fact_sjlt_case(acts, grads, 128, 96, c=2, bias=True)


def test_grass_and_sjlt_read_a_column_strided_x_in_place():
    x = random_tensor((5000, 64), torch.bfloat16, "cuda").T  # (64, 5000), column stride 64
    check_grass(x, 1024, 700, 2)
    check_sjlt(x, 1024, 2)
    check_sjlt(random_tensor((6, 2 * 7001), torch.float32, "cuda")[:, ::2], 512, 4)


@pytest.mark.parametrize("ki", [129, 256, 257])
def test_fractional_mask_with_bias_column_at_a_ragged_tile_edge(ki):
    """The bias column is the last selected input: the first slot of a second 128-tile (129),
    the last slot of a full tile (256), or alone in a third tile (257)."""
    d_in = 300
    acts = random_tensor((3, 70, d_in), torch.bfloat16, "cuda", seed=1)
    grads = random_tensor((3, 70, 200), torch.bfloat16, "cuda", seed=2)
    g = torch.Generator(device="cuda").manual_seed(7)
    mask = torch.rand(3, 70, generator=g, device="cuda")
    mask[:, -10:] = 0.0
    cols = gk.random_indices(d_in, ki - 1, seed=3).cuda()
    in_idx = torch.cat([cols, torch.tensor([d_in], device="cuda")])
    fact_grass_case(acts, grads, 1024, ki, 131, bias=True, mask=mask, in_idx=in_idx)
    fact_sjlt_case(acts, grads, 160, 130, bias=True, mask=mask)
