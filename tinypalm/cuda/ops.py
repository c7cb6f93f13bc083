"""The ops.py functions that the cupy backend replaces with CUDA kernels, and the optimizer's flat kernels.

OVERRIDES maps an ops.py name to a function with exactly that function's signature; backend.py lays them over
ops.py for the cupy backend. Each one is the twin of the ops.py function of the same name (tinypalm.gpucheck
compares them on a GPU). Kernels exist for float32 and bfloat16 storage and compute in float32; any other dtype
(float64 runs) goes to the ops.py function unchanged. A forward's cache is private to its backward: a backward
given a cache that its own forward did not make hands everything to the ops.py backward.

None of these functions reads anything back to the host: no float(), .item() or .get(), no boolean indexing.
The only host values they use are shapes and the Python scalars they are given.
"""

import math

import numpy

from .. import ops as twin
from ..backend import address
from .gemm import gemm, readable
from .source import FLASH_HEAD_DIMS, ctype, kernel

BLOCK = 256                      # threads per block, every kernel
MAX_BLOCKS = 4096                # grid-stride kernels need no more to fill an H100 (132 SMs)
NULL = numpy.uint64(0)           # a null pointer argument


def _cupy():
    import cupy
    return cupy


class _Cache(tuple):
    """A cache made by a kernel-backed forward; only the matching kernel-backed backward reads it."""


def _blocks(n):
    return max(1, min(MAX_BLOCKS, (n + BLOCK - 1) // BLOCK))


def _i32(x):
    return numpy.int32(x)


def _i64(x):
    return numpy.int64(x)


def _f32(x):
    return numpy.float32(x)


def row_layout(shape, strides, itemsize, n_lead):
    """(rows, cols, ld): an array seen as a matrix whose rows are its first n_lead axes and whose columns are the
    rest, each row contiguous and the rows evenly spaced ld elements apart (ld >= cols); None when it is not one.
    A column slice of the fused projection, e.g. proj[:, a:b].reshape(B, T, H, Dh), is such a matrix."""
    shape, strides = tuple(shape), tuple(strides)
    cols, expect = math.prod(shape[n_lead:]), itemsize
    for n, st in zip(reversed(shape[n_lead:]), reversed(strides[n_lead:])):
        if n != 1 and st != expect:
            return None
        expect *= n
    rows, ld, expect = math.prod(shape[:n_lead]), None, None
    for n, st in zip(reversed(shape[:n_lead]), reversed(strides[:n_lead])):
        if n == 1:
            continue
        if ld is None:
            if st % itemsize:
                return None
            ld = st // itemsize
        elif st != expect:
            return None
        expect = st * n
    ld = cols if ld is None else ld
    return (rows, cols, ld) if ld >= cols else None


def _as_rows(a, n_lead):
    """(a or a contiguous copy of it, (rows, cols, ld)) for a kernel that reads rows with a stride."""
    lay = row_layout(a.shape, a.strides, a.itemsize, n_lead)
    if lay is None:
        a = _cupy().ascontiguousarray(a)
        lay = row_layout(a.shape, a.strides, a.itemsize, n_lead)
    return a, lay


def _contiguous(a, dtype=None):
    return _cupy().ascontiguousarray(a, dtype=dtype)


# --- embedding ------------------------------------------------------------------------------------------------

def embedding_backward(xp, d_embed, dx, tokens):
    # d_embed (V, D) float32 += dx (B, T, D) rows at tokens (B, T): atomic adds, so repeated tokens sum; no add.at
    T = ctype(dx.dtype)
    if T is None or d_embed.dtype != numpy.float32 or not d_embed.flags.c_contiguous:
        return twin.embedding_backward(xp, d_embed, dx, tokens)
    dx, tokens = _contiguous(dx), _contiguous(tokens, numpy.int64)
    n = dx.size
    kernel("embedding", f"embedding_backward<{T}>")((_blocks(n),), (BLOCK,),
                                                   (d_embed, dx, tokens, _i64(n), _i32(d_embed.shape[1])))


# --- LayerNorm ------------------------------------------------------------------------------------------------

def layernorm_forward(x, gain, eps):
    # x (N, D), gain (D,) -> y (N, D); cache (x, mean, rstd), mean and rstd (N,) float32
    T, W = ctype(x.dtype), ctype(gain.dtype)
    if T is None or W is None:
        return twin.layernorm_forward(x, gain, eps)
    cp = _cupy()
    x, gain = _contiguous(x), _contiguous(gain)
    N, D = x.shape
    y = cp.empty_like(x)
    mean, rstd = cp.empty(N, numpy.float32), cp.empty(N, numpy.float32)
    kernel("layernorm", f"layernorm_forward<{T}, {W}>")((N,), (BLOCK,), (x, gain, y, mean, rstd, _i32(D), _f32(eps)))
    return y, _Cache((x, mean, rstd))


def layernorm_backward(dy, gain, d_gain, cache):
    # d_gain (D,) accumulates sum(dy * xhat) (None: frozen); returns dx (N, D)
    if not isinstance(cache, _Cache):
        return twin.layernorm_backward(dy, gain, d_gain, cache)
    x, mean, rstd = cache
    if d_gain is not None and (d_gain.dtype != numpy.float32 or not d_gain.flags.c_contiguous):  # twin's cache, twin
        xhat = (x.astype(d_gain.dtype) - mean[:, None]) * rstd[:, None]
        return twin.layernorm_backward(dy.astype(d_gain.dtype), gain.astype(d_gain.dtype), d_gain,
                                       (xhat, rstd[:, None].astype(d_gain.dtype)))
    cp = _cupy()
    T, W = ctype(x.dtype), ctype(gain.dtype)
    dy, gain = _contiguous(dy, x.dtype), _contiguous(gain)
    N, D = x.shape
    dx = cp.empty_like(x)
    kernel("layernorm", f"layernorm_backward_dx<{T}, {W}>")((N,), (BLOCK,), (dy, x, gain, mean, rstd, dx, _i32(D)))
    if d_gain is None:
        return dx
    rows_per_chunk = max(32, -(-N // 512))
    grid = (-(-D // BLOCK), -(-N // rows_per_chunk))
    kernel("layernorm", f"layernorm_backward_dgain<{T}>")(
        grid, (BLOCK,), (dy, x, mean, rstd, d_gain, _i32(N), _i32(D), _i32(rows_per_chunk)))
    return dx


# --- linear: the weight gradient accumulates in float32 inside cuBLAS -----------------------------------------

def _accumulable(grad):
    # None (a frozen parameter: nothing to accumulate), or a gradient cuBLAS can accumulate into with beta = 1
    return grad is None or (ctype(grad.dtype) is not None
                            and row_layout(grad.shape, grad.strides, grad.itemsize, 1) is not None)


def linear_backward(dy, x, w, dw):
    # dw (in, out) += x^T dy (beta = 1: no temporary, and a float32 dw takes bf16 inputs; None: frozen); returns
    # dx = dy w^T
    if ctype(dy.dtype) is None or x.dtype != dy.dtype or w.dtype != dy.dtype or not _accumulable(dw):
        return twin.linear_backward(dy, x, w, dw)
    if dw is not None:
        gemm(x, dy, transa=True, beta=1.0, out=dw)
    return gemm(dy, w, transb=True)


# --- parts side by side ---------------------------------------------------------------------------------------

COPY_UNITS = ((16, "uint4"), (4, "unsigned int"), (2, "unsigned short"))       # copy.cu's instances, widest first


def concat_columns(xp, parts):
    # parts (N, c_i) -> (N, sum of c_i), each part's rows copied into its columns by copy.cu in the widest unit
    # that its bytes allow (the fused projection's parts are 16-byte multiples: one uint4 per thread)
    if len({p.dtype for p in parts}) != 1 or ctype(parts[0].dtype) is None or any(p.ndim != 2 for p in parts):
        return twin.concat_columns(xp, parts)
    cp = _cupy()
    N, size = parts[0].shape[0], parts[0].itemsize
    out = cp.empty((N, sum(p.shape[1] for p in parts)), dtype=parts[0].dtype)
    col = 0
    for part in parts:
        part, (_, cols, ld) = _as_rows(part, 1)
        dst = out[:, col:col + cols]
        extents = (cols * size, ld * size, out.shape[1] * size, address(part), address(dst))
        unit, name = next((u, n) for u, n in COPY_UNITS if all(x % u == 0 for x in extents))
        kernel("copy", f"copy_rows<{name}>")((_blocks(N * cols * size // unit),), (BLOCK,), (
            part, _i64(ld * size), dst, _i64(out.shape[1] * size), _i64(N), _i64(cols * size)))
        col += cols
    return out


# --- rotary ---------------------------------------------------------------------------------------------------

def _rope(x, cos, sin, backward):
    # x (B, T, nh, Dh), cos/sin (T, 1, Dh) -> (B, T, nh, Dh), contiguous
    cp = _cupy()
    B, T_, nh, Dh = x.shape
    X, C = ctype(x.dtype), ctype(cos.dtype)
    x, (_, _, ld) = _as_rows(x, 2)                     # token rows of nh * Dh: q and k are slices of the projection
    cos, sin = _contiguous(cos).reshape(T_, Dh), _contiguous(sin).reshape(T_, Dh)
    out = cp.empty((B, T_, nh, Dh), dtype=x.dtype)
    n_pairs = B * T_ * nh * (Dh // 2)
    kernel("rope", f"rope<{X}, {C}>")((_blocks(n_pairs),), (BLOCK,), (
        x, cos, sin, out, _i64(n_pairs), _i32(T_), _i32(nh), _i32(Dh), _i64(ld), _i32(backward)))
    return out


def _rope_fits(x, cos, sin):
    return (ctype(x.dtype) is not None and ctype(cos.dtype) is not None and sin.dtype == cos.dtype
            and x.ndim == 4 and x.shape[-1] % 2 == 0 and cos.size == sin.size == x.shape[1] * x.shape[3])


def rope_forward(x, cos, sin):
    if not _rope_fits(x, cos, sin):
        return twin.rope_forward(x, cos, sin)
    return _rope(x, cos, sin, backward=0)


def rope_backward(dout, cos, sin):
    if not _rope_fits(dout, cos, sin):
        return twin.rope_backward(dout, cos, sin)
    return _rope(dout, cos, sin, backward=1)


# --- causal attention: cuBLAS batched GEMMs around a causal softmax kernel ------------------------------------

def causal_mask(xp, n_queries, n_keys, first_pos, groups, dtype):
    # the twin's additive mask (G*Tq, S), built with where: no boolean assignment, so no host synchronisation.
    # attention_forward below does not read it (it masks by position).
    q_pos = first_pos + xp.arange(n_queries)
    blocked = xp.arange(n_keys)[None, :] > q_pos[:, None]
    mask = xp.where(blocked, -numpy.inf, 0.0).astype(dtype)
    return xp.concatenate([mask] * groups, axis=0)


def _stack_heads(cp, x, Hkv):
    # (B, T, H, Dh) -> (B, Hkv, G*T, Dh), contiguous: a kv head's G query heads stacked along the rows
    B, T, H, Dh = x.shape
    G = H // Hkv
    return cp.ascontiguousarray(x.reshape(B, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4)).reshape(B, Hkv, G * T, Dh)


def _unstack_heads(x, T):
    # (B, Hkv, G*T, Dh) -> (B, T, H, Dh), a view
    B, Hkv, GT, Dh = x.shape
    G = GT // T
    return x.reshape(B, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, Dh)


def attention_forward(xp, q, k, v, mask):
    # q (B, T, H, Dh), k/v (B, S, Hkv, Dh) -> out (B, T, H, Dh). `mask` must be the causal mask of causal_mask with
    # first_pos = S - T (how the model calls it); the kernels apply it by position and never read it.
    # As in the twin, a kv head's G query heads are stacked along the rows: one GEMM per (batch, kv head).
    dt = ctype(q.dtype)
    if dt is None or k.dtype != q.dtype or v.dtype != q.dtype:
        return twin.attention_forward(xp, q, k, v, mask)
    if _flash_fits(q, k):
        return _flash_forward(q, k, v)
    cp = _cupy()
    B, T, H, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = _stack_heads(cp, q, Hkv)
    kh, vh = readable(k.transpose(0, 2, 1, 3)), readable(v.transpose(0, 2, 1, 3))       # (B, Hkv, S, Dh)
    scores = gemm(qg, kh, transb=True, alpha=1.0 / math.sqrt(Dh), out_dtype=numpy.float32)   # (B, Hkv, G*T, S)
    probs = cp.empty(scores.shape, dtype=q.dtype)
    kernel("softmax", f"causal_softmax_forward<{dt}>")((B * Hkv * G * T,), (BLOCK,), (
        scores, probs, _i32(S), _i32(G * T), _i32(T), _i32(S - T)))
    del scores
    out = gemm(probs, vh)                                                                # (B, Hkv, G*T, Dh)
    return _unstack_heads(out, T), _Cache((qg, kh, vh, probs, T))


def attention_backward(dout, cache):
    # returns dq (B, T, H, Dh), dk, dv (B, S, Hkv, Dh). scores = scale q k^T, so dq = scale dscores k and
    # dk = scale dscores^T q: the scale rides in alpha.
    if isinstance(cache, _FlashCache):
        return _flash_backward(dout, cache)
    if not isinstance(cache, _Cache):
        return twin.attention_backward(dout, cache)
    cp = _cupy()
    qg, kh, vh, probs, T = cache
    B, Hkv, GT, Dh = qg.shape
    S = kh.shape[2]
    dt = ctype(qg.dtype)
    dout_g = _stack_heads(cp, dout.astype(qg.dtype, copy=False), Hkv)
    dprobs = gemm(dout_g, vh, transb=True, out_dtype=numpy.float32)                      # (B, Hkv, G*T, S)
    dv = gemm(probs, dout_g, transa=True)                                                # (B, Hkv, S, Dh)
    dscores = cp.empty(probs.shape, dtype=probs.dtype)
    kernel("softmax", f"causal_softmax_backward<{dt}>")((B * Hkv * GT,), (BLOCK,), (dprobs, probs, dscores, _i32(S)))
    del dprobs
    scale = 1.0 / math.sqrt(Dh)
    dqg = gemm(dscores, kh, alpha=scale)                                                 # (B, Hkv, G*T, Dh)
    dk = gemm(dscores, qg, transa=True, alpha=scale)                                     # (B, Hkv, S, Dh)
    return _unstack_heads(dqg, T), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


# --- bf16 attention by tiles (flash.cu): no (rows, S) matrix in device memory ------------------------------------

FLASH_MIN_ROWS = 64              # fewer query rows (sampling one token at a time) take the GEMM path
FLASH_ROWS, FLASH_KEYS, FLASH_ROWS_DKV = 64, 64, 32     # flash.cu's ROWS, KEYS, ROWS_DKV


class _FlashCache(tuple):
    """What flash_forward leaves for the backward: q, out (B, T, H, Dh), kh, vh (B, Hkv, S, Dh), lse (B, Hkv, G*T)."""


def flash_attention_applies(dtype_name, head_dim):
    """Whether attention in this dtype and head width runs through flash.cu on this GPU, given enough query rows
    (run.py's memory estimate asks it too)."""
    return dtype_name == "bfloat16" and head_dim in FLASH_HEAD_DIMS and _bf16_tensor_cores()


def _flash_fits(q, k):
    B, T, H, Dh = q.shape
    return flash_attention_applies(q.dtype.name, Dh) and H // k.shape[2] * T >= FLASH_MIN_ROWS and k.shape[1] >= T


_BF16_MMA = {}                    # device id -> whether it has bf16 tensor cores


def _bf16_tensor_cores():
    # flash.cu's mma.sync on bf16 needs compute capability 8.0 (A100) or newer
    cp = _cupy()
    if not hasattr(cp, "cuda"):       # numpy playing cupy in the tests: the kernels are emulated
        return True
    device = cp.cuda.Device()
    if device.id not in _BF16_MMA:
        _BF16_MMA[device.id] = int(device.compute_capability) >= 80
    return _BF16_MMA[device.id]


def _flash_forward(q, k, v):
    # the kernels read q's heads and write out's in place, (B, T, H, Dh): no stacked copies
    cp = _cupy()
    B, T, H, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    GT = H // Hkv * T
    q = cp.ascontiguousarray(q)
    kh, vh = (cp.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (k, v))            # (B, Hkv, S, Dh)
    out = cp.empty_like(q)
    lse = cp.empty((B, Hkv, GT), dtype=numpy.float32)
    kernel("flash", f"flash_forward<{Dh}>")(((GT + FLASH_ROWS - 1) // FLASH_ROWS, B * Hkv), (128,), (
        q, kh, vh, out, lse, _i32(GT), _i32(T), _i32(S), _i32(S - T), _i32(Hkv), _f32(1.0 / math.sqrt(Dh))))
    return out, _FlashCache((q, out, kh, vh, lse))


def _flash_backward(dout, cache):
    cp = _cupy()
    q, out, kh, vh, lse = cache
    B, T, H, Dh = q.shape
    Hkv, S = kh.shape[1], kh.shape[2]
    G = H // Hkv
    GT = G * T
    # dout stacked (B, Hkv, GT, Dh), and delta = rowsum(dout * out), in one pass over dout (token rows of H * Dh,
    # a column slice of the model's gradient read in place)
    dout, (_, _, token) = _as_rows(dout.astype(q.dtype, copy=False), 2)
    dout_g = cp.empty((B, Hkv, GT, Dh), dtype=q.dtype)
    delta = cp.empty((B, Hkv, GT), dtype=numpy.float32)
    rows = B * Hkv * GT
    kernel("flash", f"flash_backward_prep<{Dh}>")((-(-rows // 4),), (128,), (
        dout, _i64(token), out, dout_g, delta, _i32(rows), _i32(T), _i32(Hkv), _i32(G)))
    scale = _f32(1.0 / math.sqrt(Dh))
    dq = cp.empty_like(q)
    kernel("flash", f"flash_backward_dq<{Dh}>")(((GT + FLASH_ROWS - 1) // FLASH_ROWS, B * Hkv), (128,), (
        q, kh, vh, dout_g, lse, delta, dq, _i32(GT), _i32(T), _i32(S), _i32(S - T), _i32(Hkv), scale))
    # the rows in chunks of about T (one stacked head each when T is a multiple of 32), summed afterwards: more
    # blocks at once, and the same sums in the same order on every run
    chunk_rows = -(-max(T, FLASH_ROWS_DKV) // FLASH_ROWS_DKV) * FLASH_ROWS_DKV
    chunks = -(-GT // chunk_rows)
    dk_part = cp.empty((chunks, B, Hkv, S, Dh), dtype=numpy.float32)
    dv_part = cp.empty_like(dk_part)
    kernel("flash", f"flash_backward_dkdv<{Dh}>")(((S + FLASH_KEYS - 1) // FLASH_KEYS, B * Hkv, chunks), (128,), (
        q, kh, vh, dout_g, lse, delta, dk_part, dv_part, _i32(GT), _i32(T), _i32(S), _i32(S - T), _i32(Hkv), scale,
        _i32(chunk_rows)))
    dk = cp.empty((B, S, Hkv, Dh), dtype=q.dtype)
    dv = cp.empty_like(dk)
    n = B * Hkv * S * Dh
    kernel("flash", "flash_sum_chunks")((_blocks(n),), (BLOCK,), (
        dk_part, dv_part, dk, dv, _i32(chunks), _i64(n), _i32(S), _i32(Hkv), _i32(Dh)))
    return dq, dk, dv


# --- SwiGLU ---------------------------------------------------------------------------------------------------

def swiglu_forward(xp, gate, up):
    # gate, up (N, F), column slices of the projection read in place -> hidden (N, F); the backward recomputes sig
    dt = ctype(gate.dtype)
    if dt is None or up.dtype != gate.dtype:
        return twin.swiglu_forward(xp, gate, up)
    gate, (N, F, ld_gate) = _as_rows(gate, 1)
    up, (_, _, ld_up) = _as_rows(up, 1)
    hidden = _cupy().empty((N, F), dtype=gate.dtype)
    kernel("swiglu", f"swiglu_forward<{dt}>")((_blocks(N * F),), (BLOCK,), (
        gate, up, hidden, _i64(N * F), _i32(F), _i64(ld_gate), _i64(ld_up)))
    return hidden, _Cache((gate, up))


def swiglu_backward(dhidden, cache):
    # returns d_gate, d_up (N, F)
    if not isinstance(cache, _Cache):
        return twin.swiglu_backward(dhidden, cache)
    cp = _cupy()
    gate, up = cache
    dt = ctype(gate.dtype)
    dhidden, (N, F, ld_dh) = _as_rows(dhidden.astype(gate.dtype, copy=False), 1)
    _, _, ld_gate = row_layout(gate.shape, gate.strides, gate.itemsize, 1)
    _, _, ld_up = row_layout(up.shape, up.strides, up.itemsize, 1)
    d_gate, d_up = cp.empty((N, F), dtype=gate.dtype), cp.empty((N, F), dtype=gate.dtype)
    kernel("swiglu", f"swiglu_backward<{dt}>")((_blocks(N * F),), (BLOCK,), (
        dhidden, gate, up, d_gate, d_up, _i64(N * F), _i32(F), _i64(ld_dh), _i64(ld_gate), _i64(ld_up)))
    return d_gate, d_up


# --- dropout --------------------------------------------------------------------------------------------------

def mix32(h):
    """murmur3's 32-bit finaliser on a Python int, as ops._mix32 computes it on uint32 arrays."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def dropout_key_threshold(rate, seed):
    """The two host values of the mask: key = mix32(seed), threshold = rate * 2^32 (as in ops.dropout_mask)."""
    return mix32(seed & 0xFFFFFFFF), min(int(rate * 2**32), 2**32 - 1)


def dropout_mask(xp, shape, rate, seed, first=0):
    # keep (shape) bool, bit-identical to the twin's
    cp = _cupy()
    n = math.prod(shape)
    key, threshold = dropout_key_threshold(rate, seed)
    keep = cp.empty(shape, dtype=numpy.bool_)
    kernel("dropout", "dropout_mask")((_blocks(n),), (BLOCK,), (keep, _i64(n), numpy.uint32(first & 0xFFFFFFFF),
                                                                numpy.uint32(key), numpy.uint32(threshold)))
    return keep


def _dropout_apply(x, rate, keep):
    dt = ctype(x.dtype)
    x, keep = _contiguous(x), _contiguous(keep)
    y = _cupy().empty_like(x)
    kernel("dropout", f"dropout_apply<{dt}>")((_blocks(x.size),), (BLOCK,), (
        x, keep, y, _i64(x.size), _f32(1.0 / (1.0 - rate))))
    return y


def dropout_forward(x, rate, keep):
    if ctype(x.dtype) is None or keep.dtype != numpy.bool_ or keep.shape != x.shape:
        return twin.dropout_forward(x, rate, keep)
    return _dropout_apply(x, rate, keep)


def dropout_backward(dy, rate, keep):
    if ctype(dy.dtype) is None or keep.dtype != numpy.bool_ or keep.shape != dy.shape:
        return twin.dropout_backward(dy, rate, keep)
    return _dropout_apply(dy, rate, keep)


# --- tied output projection and the loss ----------------------------------------------------------------------

def tied_logits_forward(h, embed):
    # h (N, D), embed (V, D) -> logits (N, V) = h embed^T / sqrt(D): one GEMM, the scale in alpha
    if ctype(h.dtype) is None or embed.dtype != h.dtype:
        return twin.tied_logits_forward(h, embed)
    return gemm(h, embed, transb=True, alpha=1.0 / math.sqrt(embed.shape[1]))


def tied_logits_backward(dlogits, h, embed, d_embed):
    # d_embed (V, D) += dlogits^T h / sqrt(D), accumulated by cuBLAS (float32 d_embed, bf16 inputs; None:
    # frozen); returns dh
    if (ctype(dlogits.dtype) is None or h.dtype != dlogits.dtype or embed.dtype != dlogits.dtype
            or not _accumulable(d_embed)):
        return twin.tied_logits_backward(dlogits, h, embed, d_embed)
    scale = 1.0 / math.sqrt(embed.shape[1])
    if d_embed is not None:
        gemm(dlogits, h, transa=True, alpha=scale, beta=1.0, out=d_embed)
    return gemm(dlogits, embed, alpha=scale)


def _row_losses(logits, targets, z_loss):
    # per row n: log_z_n and log_z_n - logit_n[t_n] + z_loss log_z_n^2, in float32 (N,) each
    cp = _cupy()
    N, V = logits.shape
    log_z, row_loss = cp.empty(N, numpy.float32), cp.empty(N, numpy.float32)
    kernel("cross_entropy", f"cross_entropy_forward<{ctype(logits.dtype)}>")((N,), (BLOCK,), (
        logits, targets, log_z, row_loss, _i32(V), _f32(z_loss)))
    return log_z, row_loss


def _cross_entropy_grad(logits, targets, log_z, z_loss, row_weight):
    # dlogits (N, V) in the logits' dtype; row_weight (N,) float32, or None for 1/N on every row
    N, V = logits.shape
    dlogits = _cupy().empty_like(logits)
    kernel("cross_entropy", f"cross_entropy_backward<{ctype(logits.dtype)}>")((N,), (BLOCK,), (
        logits, targets, log_z, dlogits, _i32(V), _f32(z_loss), _f32(1.0 / N), NULL if row_weight is None else row_weight))
    return dlogits


def cross_entropy_forward(xp, logits, targets, z_loss):
    # logits (N, V), targets (N,) -> loss, a 0-d float64 device array (read it once per step, with the others)
    if ctype(logits.dtype) is None:
        return twin.cross_entropy_forward(xp, logits, targets, z_loss)
    logits, targets = _contiguous(logits), _contiguous(targets, numpy.int64)
    log_z, row_loss = _row_losses(logits, targets, z_loss)
    return row_loss.mean(dtype=numpy.float64), _Cache((logits, log_z, targets))


def cross_entropy_backward(xp, cache, z_loss):
    # returns dlogits (N, V), in the logits' dtype
    if not isinstance(cache, _Cache):
        return twin.cross_entropy_backward(xp, cache, z_loss)
    logits, log_z, targets = cache
    return _cross_entropy_grad(logits, targets, log_z, z_loss, None)


def masked_cross_entropy_forward(xp, logits, targets, loss_mask, z_loss):
    # logits (N, V), targets (N,), loss_mask (N,) -> the mean over the counted rows: sum_n w_n row_loss_n, with
    # w = mask / sum mask, or 0 where nothing counts (float32 (N,), kept for the backward: 0 on the rows not counted)
    if ctype(logits.dtype) is None:
        return twin.masked_cross_entropy_forward(xp, logits, targets, loss_mask, z_loss)
    logits, targets = _contiguous(logits), _contiguous(targets, numpy.int64)
    log_z, row_loss = _row_losses(logits, targets, z_loss)
    weight = loss_mask.astype(numpy.float32)
    total = weight.sum()
    weight /= _cupy().where(total > 0, total, 1)
    return (row_loss * weight).sum(dtype=numpy.float64), _Cache((logits, log_z, targets, weight))


def masked_cross_entropy_backward(xp, cache, z_loss):
    # returns dlogits (N, V), in the logits' dtype, zero on the rows not counted
    if not isinstance(cache, _Cache):
        return twin.masked_cross_entropy_backward(xp, cache, z_loss)
    logits, log_z, targets, weight = cache
    return _cross_entropy_grad(logits, targets, log_z, z_loss, weight)


OVERRIDES = {f.__name__: f for f in (
    embedding_backward, layernorm_forward, layernorm_backward, linear_backward, concat_columns, rope_forward,
    rope_backward, causal_mask, attention_forward, attention_backward, swiglu_forward, swiglu_backward, dropout_mask,
    dropout_forward, dropout_backward, tied_logits_forward, tied_logits_backward, cross_entropy_forward,
    cross_entropy_backward, masked_cross_entropy_forward, masked_cross_entropy_backward)}


# --- the optimizer step over flat float32 buffers -------------------------------------------------------------

_MASKS = {}


def _byte_mask(spec, n):
    """None, a device mask (bool or uint8, n elements), or (start, stop) ranges -> None or a uint8 device mask.
    Masks made from ranges are kept, so an optimizer may pass the same ranges every step."""
    if spec is None:
        return None
    cp = _cupy()
    if isinstance(spec, cp.ndarray):
        if spec.size != n:
            raise ValueError(f"mask has {spec.size} elements, the buffers {n}")
        return _contiguous(spec.reshape(-1)).view(numpy.uint8) if spec.dtype == numpy.bool_ else \
            _contiguous(spec.reshape(-1), numpy.uint8)
    key = (cp, tuple((int(a), int(b)) for a, b in spec), n)     # cp: a stand-in's masks are not a GPU's
    if key not in _MASKS:
        if len(_MASKS) > 16:
            _MASKS.clear()
        mask = cp.zeros(n, dtype=numpy.uint8)
        for start, stop in key[1]:
            mask[start:stop] = 1
        _MASKS[key] = mask
    return _MASKS[key]


def global_grad_norm(g):
    """The L2 norm of a flat gradient buffer as a 0-d device array (float32), in one reduction pass; no host
    synchronisation. Pass it to adamw_flat(grad_norm=...) to clip on the device."""
    cp = _cupy()
    if g.dtype != numpy.float32:
        return cp.sqrt((g * g).sum())
    g = _contiguous(g).reshape(-1)
    sum_sq, norm = cp.zeros((), dtype=numpy.float64), cp.empty((), dtype=numpy.float32)
    blocks = max(1, min(1024, (g.size + BLOCK - 1) // BLOCK))
    kernel("adamw", "sum_squares")((blocks,), (BLOCK,), (g, _i64(g.size), sum_sq))
    kernel("adamw", "sqrt_to_float")((1,), (1,), (sum_sq, norm))
    return norm


def adamw_flat(p, g, m, v, decay, lr, beta1, beta2, eps, weight_decay, t, frozen=None, p_compute=None,
               grad_norm=None, max_norm=0.0):
    """One AdamW step (as optim.AdamW) over flat float32 buffers p, g, m, v (n,), in place, in one launch.

    decay, frozen: None, a device mask (n,) of bool/uint8, or a sequence of (start, stop) ranges: weight decay
    applies where decay is set; frozen elements are left untouched (p, m and v). t is the step number, from 1.
    p_compute: the bf16 compute copy of p (n,), rewritten from the updated p in the same pass (frozen elements
    keep theirs).
    grad_norm: a 0-d device array (global_grad_norm(g)); with max_norm > 0 the update uses g scaled by
    max_norm / (norm + 1e-6) when norm > max_norm, i.e. clipping without reading the norm on the host (g itself is
    not modified). No host synchronisation."""
    n = p.size
    step_size, v_correction = lr / (1.0 - beta1 ** t), 1.0 - beta2 ** t
    flat_f32 = all(a.dtype == numpy.float32 and a.flags.c_contiguous and a.size == n for a in (p, g, m, v))
    if not flat_f32:
        return _adamw_xp(p, g, m, v, decay, lr, beta1, beta2, eps, weight_decay, step_size, v_correction, frozen,
                         p_compute, grad_norm, max_norm)
    decay_mask, frozen_mask = _byte_mask(decay, n), _byte_mask(frozen, n)
    compute_bf16 = p_compute is not None and p_compute.dtype.name == "bfloat16" and p_compute.flags.c_contiguous
    if grad_norm is not None:
        grad_norm = _contiguous(grad_norm, numpy.float32)
    kernel("adamw", "adamw_flat")((_blocks(n),), (BLOCK,), (
        p, g, m, v, NULL if decay_mask is None else decay_mask, NULL if frozen_mask is None else frozen_mask,
        p_compute if compute_bf16 else NULL, NULL if grad_norm is None else grad_norm, _i64(n),
        _f32(lr), _f32(beta1), _f32(beta2), _f32(eps), _f32(weight_decay), _f32(step_size), _f32(v_correction),
        _f32(max_norm)))
    if p_compute is not None and not compute_bf16:
        p_compute[...] = p.reshape(p_compute.shape)


def adamw_ranges(runs, n):
    """(decay, frozen) ranges for adamw_flat from optim.update_runs' [(start, stop, decayed)] over n elements:
    decay where a decayed run lies, frozen wherever no run does."""
    decay, frozen, at = [], [], 0
    for start, stop, decayed in sorted(runs):
        if start > at:
            frozen.append((at, start))
        if decayed:
            decay.append((start, stop))
        at = stop
    if at < n:
        frozen.append((at, n))
    return decay, frozen


def _adamw_xp(p, g, m, v, decay, lr, beta1, beta2, eps, weight_decay, step_size, v_correction, frozen, p_compute,
              grad_norm, max_norm):
    # the same step in array operations, for buffers the kernel does not take (float64 runs)
    cp = _cupy()
    n = p.size
    decay_mask, frozen_mask = _byte_mask(decay, n), _byte_mask(frozen, n)
    p1, g1, m1, v1 = (a.reshape(-1) for a in (p, g, m, v))
    if grad_norm is not None and max_norm > 0:
        g1 = g1 * cp.where(grad_norm > max_norm, max_norm / (grad_norm + 1e-6), 1.0).astype(g1.dtype)
    keep = None if frozen_mask is None else frozen_mask.astype(bool)
    new_m = beta1 * m1 + (1.0 - beta1) * g1
    new_v = beta2 * v1 + (1.0 - beta2) * (g1 * g1)
    new_p = p1
    if decay_mask is not None and weight_decay:
        new_p = new_p * cp.where(decay_mask.astype(bool), 1.0 - lr * weight_decay, 1.0).astype(p1.dtype)
    new_p = new_p - step_size * new_m / ((new_v / v_correction) ** 0.5 + eps)
    if keep is not None:
        new_m, new_v, new_p = (cp.where(keep, old, new) for old, new in ((m1, new_m), (v1, new_v), (p1, new_p)))
    m1[...], v1[...], p1[...] = new_m, new_v, new_p
    if p_compute is not None:
        p_compute[...] = p.reshape(p_compute.shape)
