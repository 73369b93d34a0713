"""Device-side building blocks shared by the Triton kernels (all ``@triton.jit``).

Conventions: pointer offsets that grow with a tensor's size are computed in int64 by the
callers (``rows.to(tl.int64) * stride``); positions into an SJLT table stay int32 because the
launchers check ``codes.numel() < 2**31``. Every accumulation is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode(code):
    """SJLT code -> (bucket, negative); a bucket b with sign -1 is stored as ~b (``_tables``)."""
    negative = code < 0
    return tl.where(negative, ~code, code), negative


@triton.jit
def scatter_to_buckets(out_rows, vals, pos, pos_mask, mask, codes_ptr, c, scale):
    """For j < c: out_rows[bucket_j(pos)] += sign_j(pos) * scale * vals, atomically.

    out_rows  pointers to the start of each value's output row, broadcastable with ``vals``
    vals      fp32 tile of values; ``pos`` their rows in the (·, c) table, broadcastable with it
    pos_mask  which ``pos`` are real (shape of ``pos``); ``mask`` which values to add

    The atomics are relaxed: nothing reads ``out`` until the kernel ends, so no ordering is
    needed, and with the result unused ptxas emits fire-and-forget reductions (REDG in the
    sm_90 SASS) that resolve in L2. Every bucket lies in the output row: the launchers check
    the table (``_launch.check_ranges``) before the launch.
    """
    for j in range(c):
        code = tl.load(codes_ptr + pos * c + j, mask=pos_mask, other=0)
        bucket, negative = decode(code)
        signed = tl.where(negative, -vals, vals) * scale
        tl.atomic_add(out_rows + bucket, signed, mask=mask, sem="relaxed")


@triton.jit
def load_inputs(ptrs, mask, cols, d, BIAS: tl.constexpr):
    """A tile of layer inputs in their own dtype; column ``d`` reads 1.0 when BIAS.

    ptrs (R, C) element pointers, mask (R, C), cols (R, C) or (1, C) column numbers. The
    virtual bias column (index d_in of acts) is never stored: its pointer is masked off and
    the value made here, so acts is never copied to append it.
    """
    vals = tl.load(ptrs, mask=mask & (cols < d), other=0.0)
    if BIAS:
        # Through fp32 (exact for every input dtype): the interpreter has no bf16 constants.
        vals = tl.where(mask & (cols == d), 1.0, vals.to(tl.float32)).to(vals.dtype)
    return vals


@triton.jit
def dot(a, b, acc, NATIVE: tl.constexpr):
    """acc + a @ b in fp32.

    NATIVE: multiply in a's 16-bit dtype on tensor cores, b cast to it: exact for 16-bit
    inputs and +-1 sign tiles; LoGra's fp32 P rounds to 16 bits (relative error ~1e-3, inside
    the 16-bit tolerance). Otherwise both operands go to fp32 with IEEE products: for fp32
    inputs (the spec allows 1e-5, TF32 would not meet it) and under the interpreter, whose
    bf16 dot gives wrong results.
    """
    if NATIVE:
        return tl.dot(a, b.to(a.dtype), acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def sign_tile(codes_ptr, rows, row_mask, c, cols):
    """The SJLT as a dense tile: S[i, b] = s_j(i) where h_j(i) = b, else 0; (R, K) fp32.

    rows (R,) input coordinates, cols (K,) buckets. Entries are -1, 0 or +1 (the c buckets of
    a coordinate are distinct) and exact in any dtype; the 1/sqrt(c) is applied by the caller.
    """
    tile = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
    for j in range(c):
        code = tl.load(codes_ptr + rows * c + j, mask=row_mask, other=0)
        bucket, negative = decode(code)
        hit = (bucket[:, None] == cols[None, :]) & row_mask[:, None]
        tile += tl.where(hit, tl.where(negative, -1.0, 1.0)[:, None], 0.0)
    return tile


@triton.jit
def project(row_ptrs, row_mask, stride_d, d, table, stride_tk, stride_td, c, kk, k,
            BIAS: tl.constexpr, SIGNS: tl.constexpr, NATIVE: tl.constexpr,
            BD: tl.constexpr):
    """Rows of a layer input times a projection: (R, d') @ table^T[:, kk] -> (R, K) fp32.

    row_ptrs (R, 1) row starts, row_mask (R, 1); d' = d + BIAS. The table is a dense
    (k, d') matrix with strides (stride_tk, stride_td) (LoGra), or with SIGNS an SJLT code
    table (d', c) whose sign tile is built in registers, so the hash-scatter of every
    token runs as one tensor-core product (FactSJLT).
    """
    width = d
    if BIAS:
        width = d + 1
    k_mask = kk < k
    acc = tl.zeros((row_ptrs.shape[0], kk.shape[0]), tl.float32)
    for d0 in range(0, width, BD):
        dd = d0 + tl.arange(0, BD)
        d_mask = dd < width
        x = load_inputs(row_ptrs + dd[None, :].to(tl.int64) * stride_d,
                        row_mask & d_mask[None, :], dd[None, :], d, BIAS)
        if SIGNS:
            tile = sign_tile(table, dd, d_mask, c, kk)
        else:
            tile = tl.load(table + kk[None, :] * stride_tk + dd[:, None] * stride_td,
                           mask=d_mask[:, None] & k_mask[None, :], other=0.0)
        acc = dot(x, tile, acc, NATIVE)
    return acc


@triton.jit
def write_tile(ptrs, vals, mask, ATOMIC: tl.constexpr):
    """Store a finished tile, or add it atomically when several programs share the tile."""
    if ATOMIC:
        tl.atomic_add(ptrs, vals, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit
def outer_sketch_program(acts, sa_b, sa_t, sa_d, d_in, grads, sg_b, sg_t, sg_d, d_out,
                         token_mask, sm_b, sm_t, T,
                         in_table, in_tk, in_td, out_table, out_tk, out_td, c,
                         out, k_in, k_out, scale,
                         BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SIGNS: tl.constexpr,
                         NATIVE: tl.constexpr, ATOMIC: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr, BKO: tl.constexpr, BKI: tl.constexpr):
    """One program of LoGra (dense P) or FactSJLT (SIGNS: P is an SJLT): the (BKO x BKI)
    tile of scale * sum_t (P_out delta_t)(P_in x_t)^T over its share of one example's tokens,
    written into out (B, k_out * k_in).

    Grid: (example, token split, output tile). Programs along axis 1 split the tokens:
    T-tiles program_id(1), +num_programs(1), ... Each T-tile is projected on both sides
    (reading its X and Delta rows once) and the outer product accumulated in registers;
    nothing of size T or d leaves the chip.
    """
    b = tl.program_id(0).to(tl.int64)
    tiles_in = tl.cdiv(k_in, BKI)
    ko = (tl.program_id(2) // tiles_in) * BKO + tl.arange(0, BKO)
    ki = (tl.program_id(2) % tiles_in) * BKI + tl.arange(0, BKI)
    acts_b = acts + b * sa_b
    grads_b = grads + b * sg_b
    acc = tl.zeros((BKO, BKI), tl.float32)
    for t0 in range(tl.program_id(1) * BT, T, tl.num_programs(1) * BT):
        t = t0 + tl.arange(0, BT)
        t_mask = (t < T)[:, None]
        t64 = t.to(tl.int64)[:, None]
        xp = project(acts_b + t64 * sa_t, t_mask, sa_d, d_in, in_table, in_tk, in_td, c,
                     ki, k_in, BIAS, SIGNS, NATIVE, BD)
        gp = project(grads_b + t64 * sg_t, t_mask, sg_d, d_out, out_table, out_tk, out_td, c,
                     ko, k_out, False, SIGNS, NATIVE, BD)
        if HAS_MASK:
            # Masking the (BT, K) projection is exact and cheaper than masking the inputs.
            xp *= tl.load(token_mask + b * sm_b + t * sm_t, mask=t < T, other=0.0)[:, None]
        # The outer product is small (K x BT x K against the BT x d x K projections): fp32
        # IEEE for fp32 inputs, TF32 for 16-bit ones (error ~1e-3, inside their tolerance).
        if NATIVE:
            acc = tl.dot(tl.trans(gp), xp, acc, input_precision="tf32")
        else:
            acc = tl.dot(tl.trans(gp), xp, acc, input_precision="ieee")
    write_tile(out + b * k_out * k_in + ko[:, None] * k_in + ki[None, :], acc * scale,
               (ko < k_out)[:, None] & (ki < k_in)[None, :], ATOMIC)
