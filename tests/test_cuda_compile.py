"""The CUDA kernels without a GPU: every kernel compiles for sm_80 and sm_90 through NVRTC (CuPy's bindings, the
NVRTC wheel of the `test` extra), and the pure-Python parts around them are checked against numpy.

What needs a GPU (each kernel against its ops.py twin, the model on cupy against numpy) is in tinypalm.gpucheck;
the last test here runs its kernel comparisons when a GPU is present."""

import inspect
import re
import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from tinypalm import batch_threads, ops
from tinypalm.cuda import ops as cuda_ops
from tinypalm.cuda import gemm as gemm_module
from tinypalm.cuda import source
from tinypalm.cuda.gemm import gemm_args, matrix_layout

ARCHS = ("sm_80", "sm_90")


def needs_nvrtc():
    # CuPy's NVRTC bindings come with the test extra, except on macOS (CUDA has no wheels there): skipped there
    # alone, so that a test install that lacks them elsewhere fails rather than passes quietly
    if sys.platform == "darwin":
        pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CUDA has no macOS wheels")


# --- compilation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(source.KERNELS))
def test_kernel_compiles_to_machine_code(name, arch):
    needs_nvrtc()
    cubin, lowered = source.compile_cubin(name, arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000          # a cubin: ptxas ran for this architecture
    assert set(lowered) == set(source.KERNELS[name])               # every instance the wrappers launch exists
    for instance, mangled in lowered.items():
        assert mangled.encode() in cubin, instance


def test_a_machine_code_error_fails_the_compile(monkeypatch):
    needs_nvrtc()
    # an inline-PTX typo (.f33) passes a PTX-only compile; a real sm_XX target runs ptxas, which rejects it
    bad = source.kernel_source("embedding") + (
        '\n__global__ void typo(float* x) { asm("add.f33 %0, %0, %0;" : "+f"(x[0])); }\n')
    monkeypatch.setattr(source, "kernel_source", lambda name: bad)
    with pytest.raises(RuntimeError, match="embedding.cu for sm_90"):
        source.compile_cubin("embedding", "sm_90")


def test_a_syntax_error_is_reported_with_the_compiler_log(monkeypatch):
    needs_nvrtc()
    monkeypatch.setattr(source, "kernel_source", lambda name: "__global__ void broken( {}")
    with pytest.raises(RuntimeError, match="error"):
        source.compile_cubin("embedding", "sm_80")


def test_cuda_headers_are_found():
    import os
    needs_nvrtc()
    assert os.path.exists(os.path.join(source.cuda_include_dir(), "cuda_bf16.h"))


def test_overrides_have_exactly_the_signatures_of_the_ops_they_replace():
    assert len(cuda_ops.OVERRIDES) >= 18
    for name, fn in cuda_ops.OVERRIDES.items():
        assert inspect.signature(fn) == inspect.signature(getattr(ops, name)), name


# --- the GEMM argument mapping, run through a column-major cuBLAS written in numpy -----------------------------

def memory(a, n, start=0):
    """The n elements a kernel (or cuBLAS) can address from a's first element, as a writeable 1-D view from start."""
    return as_strided(a, shape=(n,), strides=(a.itemsize,), writeable=True)[start:]


def fake_cublas_gemm(args, alpha, beta, first, second, out):
    """cublasGemmStridedBatchedEx's definition, column-major, on the memory the operands' pointers address:
    C_i = alpha op(A_i) op(B_i) + beta C_i with A = first, B = second; C is not read when beta is 0."""
    assert first.dtype == second.dtype and out.dtype in (np.float32, first.dtype)

    def colmajor(x, off, rows, cols, ld):
        return as_strided(memory(x, off + 1, off), shape=(rows, cols), strides=(x.itemsize, ld * x.itemsize),
                          writeable=True)

    m, n, k = args["m"], args["n"], args["k"]
    for i in range(args["batch"]):
        shape_a = (m, k) if args["op_first"] == "N" else (k, m)
        shape_b = (k, n) if args["op_second"] == "N" else (n, k)
        A = colmajor(first, i * args["stride_first"], *shape_a, args["ld_first"]).astype(np.float64)
        B = colmajor(second, i * args["stride_second"], *shape_b, args["ld_second"]).astype(np.float64)
        C = colmajor(out, i * args["stride_c"], m, n, args["ldc"])
        product = alpha * ((A if args["op_first"] == "N" else A.T) @ (B if args["op_second"] == "N" else B.T))
        C[...] = product + beta * C.astype(np.float64) if beta else product


def cpu_gemm(a_spec, b_spec, c_spec, transa, transb, alpha, beta, rng):
    (a_shape, a_view), (b_shape, b_view), (c_shape, c_view) = a_spec, b_spec, c_spec
    a, b = a_view(rng.standard_normal(a_shape)), b_view(rng.standard_normal(b_shape))
    c = c_view(rng.standard_normal(c_shape))
    expected = alpha * np.matmul(np.swapaxes(a, -1, -2) if transa else a,
                                 np.swapaxes(b, -1, -2) if transb else b) + beta * c
    la, lb, lc = (matrix_layout(x.shape, x.strides, x.itemsize) for x in (a, b, c))
    assert None not in (la, lb, lc)
    fake_cublas_gemm(gemm_args(la, lb, lc, transa, transb), alpha, beta, b, a, c)     # b first, as gemm does
    np.testing.assert_allclose(c, expected, rtol=1e-12, atol=1e-12)


def same(x):
    return x


@pytest.mark.parametrize("transa", [False, True])
@pytest.mark.parametrize("transb", [False, True])
def test_gemm_mapping_2d(transa, transb):
    rng = np.random.default_rng(0)
    M, K, N = 5, 7, 3
    a_shape = (K, M) if transa else (M, K)
    b_shape = (N, K) if transb else (K, N)
    cpu_gemm((a_shape, same), (b_shape, same), ((M, N), same), transa, transb, 1.0, 0.0, rng)
    # column slices of wider matrices (row stride > columns), alpha and accumulation into the output
    cpu_gemm(((a_shape[0], a_shape[1] + 4), lambda x: x[:, 2:2 + a_shape[1]]),
             ((b_shape[0], b_shape[1] + 3), lambda x: x[:, 1:1 + b_shape[1]]),
             ((M, N + 6), lambda x: x[:, 5:5 + N]), transa, transb, 0.125, 1.0, rng)


def test_gemm_mapping_attention_shapes():
    rng = np.random.default_rng(1)
    B, Hkv, G, T, S, Dh = 2, 2, 3, 4, 6, 5
    # scores = q k^T, k read in place as (B, Hkv, S, Dh) from a slice of a (B, S, width) projection with Hkv = 1
    cpu_gemm(((B, Hkv, G * T, Dh), same),
             ((B, Hkv, S, Dh), same), ((B, Hkv, G * T, S), same), False, True, 0.5, 0.0, rng)
    cpu_gemm(((B, 1, G * T, Dh), same),
             ((B, S, 11), lambda x: x[:, :, 3:3 + Dh].reshape(B, S, 1, Dh).transpose(0, 2, 1, 3)),
             ((B, 1, G * T, S), same), False, True, 1.0, 0.0, rng)
    # dk = dscores^T q (transa), and a 2-D operand shared by every batch (stride 0)
    cpu_gemm(((B, Hkv, G * T, S), same), ((B, Hkv, G * T, Dh), same), ((B, Hkv, S, Dh), same), True, False,
             1.0, 0.0, rng)
    cpu_gemm(((B, Hkv, G * T, S), same), ((S, Dh), same), ((B, Hkv, G * T, Dh), same), False, False, 1.0, 0.0, rng)


def test_matrix_layout_refuses_what_cublas_cannot_read():
    x = np.zeros((4, 6, 8))
    assert matrix_layout(x.shape, x.strides, 8) == (4, 6, 8, 8, 48)
    t = x.transpose(0, 2, 1)                                       # columns not contiguous
    assert matrix_layout(t.shape, t.strides, 8) is None
    y = np.zeros((3, 4, 5, 6)).transpose(1, 0, 2, 3)               # batch axes that do not collapse
    assert matrix_layout(y.shape, y.strides, 8) is None
    z = as_strided(np.zeros(40), shape=(6, 8), strides=(32, 8))    # overlapping rows
    assert matrix_layout(z.shape, z.strides, 8) is None
    with pytest.raises(ValueError):
        gemm_args(matrix_layout((3, 4), (32, 8), 8), matrix_layout((5, 2), (16, 8), 8),
                  matrix_layout((3, 2), (16, 8), 8), False, False)


# --- row layouts of strided activations ------------------------------------------------------------------------

def test_row_layout_reads_a_projection_slice_in_place():
    B, T, H, Dh, width = 2, 3, 4, 5, 50
    proj = np.arange(B * T * width, dtype=np.float32).reshape(B * T, width)
    q = proj[:, 7:7 + H * Dh].reshape(B, T, H, Dh)                 # a view, as the model makes it
    rows, cols, ld = cuda_ops.row_layout(q.shape, q.strides, q.itemsize, 2)
    assert (rows, cols, ld) == (B * T, H * Dh, width)
    flat = proj.reshape(-1)[7:]                                    # what a kernel sees from q's first element
    for r in range(rows):
        np.testing.assert_array_equal(flat[r * ld:r * ld + cols], q.reshape(rows, cols)[r])
    gate = proj[:, 20:31]
    assert cuda_ops.row_layout(gate.shape, gate.strides, 4, 1) == (B * T, 11, width)
    t = np.zeros((4, 6)).T
    assert cuda_ops.row_layout(t.shape, t.strides, 8, 1) is None
    a = np.zeros((3, 4, 5))[:, ::2]                                # every other row: evenly spaced, ld 10
    assert cuda_ops.row_layout(a.shape, a.strides, 8, 2) == (6, 5, 10)
    b = np.zeros((3, 4, 5))[:, :3]                                 # a gap after every third row: not a matrix
    assert cuda_ops.row_layout(b.shape, b.strides, 8, 2) is None


# --- the dropout mask's host half: with it, the kernel's formula reproduces ops.dropout_mask bit for bit ---------

@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 987654321987])
def test_dropout_key_and_formula_match_the_twin(seed):
    key_array = ops._mix32(np, np.asarray([seed & 0xFFFFFFFF], dtype=np.uint32))
    assert cuda_ops.mix32(seed) == int(key_array[0])
    for (rate, shape), first in zip([(0.1, (7, 13)), (0.5, (3, 4, 5)), (0.0, (9,)), (0.999, (64,))],
                                    [0, 1000, 2**32 - 5, 2**33 + 3]):
        key, threshold = cuda_ops.dropout_key_threshold(rate, seed)
        i = np.arange(np.prod(shape), dtype=np.uint32)
        # the kernel: keep[i] = mix32(((uint32)i + first) * 0x9E3779B1 + key) >= threshold, wrapping uint32 arithmetic
        h = (i + np.uint32(first & 0xFFFFFFFF)) * np.uint32(0x9E3779B1) + np.uint32(key)
        keep = np.array([cuda_ops.mix32(int(x)) for x in h]) >= threshold
        np.testing.assert_array_equal(keep.reshape(shape), ops.dropout_mask(np, shape, rate, seed, first))


# --- the Python around the kernels, with each kernel emulated in numpy ------------------------------------------
# No CPU runs CUDA C, but everything around a kernel can run: tinypalm.gpucheck's comparisons with the twins go
# through tinypalm.cuda.ops with numpy playing cupy, cuBLAS played by fake_cublas_gemm, and each kernel played
# by a numpy transcription of its .cu source that reads memory the way the kernel does (from the pointers it is
# given, with the strides and counts it is given). Every launch is checked against the kernel's C signature:
# argument count, scalar widths (CuPy packs a scalar by its numpy type) and pointer element types, and the
# instance launched must be one the module compiles. What this cannot catch is an error in the C itself.

C_TYPES = {"float": "float32", "__nv_bfloat16": "bfloat16", "long long": "int64", "int": "int32",
           "unsigned int": "uint32", "bool": "bool", "unsigned char": "uint8", "double": "float64",
           "void": None}                                                    # void*: bytes, any array


def kernel_signatures():
    """kernel name -> (template parameter names, [(C base type, is_pointer)]) from the .cu sources."""
    sigs = {}
    for name in source.KERNELS:
        text = source.kernel_source(name)
        for m in re.finditer(r"(?:template\s*<([^>]*)>\s*)?__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*(?://[^\n]*)?\s*)?(\w+)\s*\(([^)]*)\)", text):
            tparams = [p.split()[-1] for p in m.group(1).split(",")] if m.group(1) else []
            params = []
            for p in m.group(3).split(","):
                p = " ".join(p.replace("const ", "").split())
                pointer = "*" in p
                base = p.split("*")[0].strip() if pointer else p.rsplit(" ", 1)[0]
                params.append((base, pointer))
            sigs[m.group(2)] = (tparams, params)
    return sigs


SIGNATURES = kernel_signatures()


def _f64(a):
    return np.asarray(a).astype(np.float64)


def emu_layernorm_forward(grid, block, x, gain, y, mean, rstd, D, eps):
    N = grid[0]
    X, G = _f64(memory(x, N * D)).reshape(N, D), _f64(memory(gain, D))
    mu = X.mean(1)
    rs = 1 / np.sqrt(((X - mu[:, None]) ** 2).mean(1) + eps)
    memory(y, N * D)[:] = ((X - mu[:, None]) * rs[:, None] * G).reshape(-1)
    memory(mean, N)[:], memory(rstd, N)[:] = mu, rs


def emu_layernorm_backward_dx(grid, block, dy, x, gain, mean, rstd, dx, D):
    N = grid[0]
    X, DY, G = _f64(memory(x, N * D)).reshape(N, D), _f64(memory(dy, N * D)).reshape(N, D), _f64(memory(gain, D))
    mu, rs = _f64(memory(mean, N))[:, None], _f64(memory(rstd, N))[:, None]
    g, xhat = DY * G, (X - mu) * rs
    memory(dx, N * D)[:] = ((g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True)) * rs).reshape(-1)


def emu_layernorm_backward_dgain(grid, block, dy, x, mean, rstd, d_gain, N, D, rows_per_chunk):
    assert grid[0] * block[0] >= D and grid[1] * rows_per_chunk >= N          # every column and row is covered
    X, DY = _f64(memory(x, N * D)).reshape(N, D), _f64(memory(dy, N * D)).reshape(N, D)
    xhat = (X - _f64(memory(mean, N))[:, None]) * _f64(memory(rstd, N))[:, None]
    memory(d_gain, D)[:] += (DY * xhat).sum(0)


def emu_rope(grid, block, x, cos, sin, out, n_pairs, T, n_heads, Dh, ld_x, backward):
    h = Dh // 2
    i = np.arange(n_pairs)
    j, vec = i % h, i // h
    token, head = vec // n_heads, vec % n_heads
    t = token % T
    X = _f64(memory(x, (token.max()) * ld_x + n_heads * Dh))
    C, S = _f64(memory(cos, T * Dh)), _f64(memory(sin, T * Dh))
    a, b = X[token * ld_x + head * Dh + j], X[token * ld_x + head * Dh + j + h]
    c1, c2, s1, s2 = C[t * Dh + j], C[t * Dh + j + h], S[t * Dh + j], S[t * Dh + j + h]
    O = memory(out, n_pairs * 2)
    if backward:
        O[vec * Dh + j], O[vec * Dh + j + h] = a * c1 + b * s2, b * c2 - a * s1
    else:
        O[vec * Dh + j], O[vec * Dh + j + h] = a * c1 - b * s1, b * c2 + a * s2


def _strided_rows(a, n, F, ld):
    i = np.arange(n)
    r, c = i // F, i % F
    return _f64(memory(a, (n // F - 1) * ld + F))[r * ld + c]


def emu_swiglu_forward(grid, block, gate, up, hidden, n, F, ld_gate, ld_up):
    g, u = _strided_rows(gate, n, F, ld_gate), _strided_rows(up, n, F, ld_up)
    memory(hidden, n)[:] = g / (1 + np.exp(-g)) * u


def emu_swiglu_backward(grid, block, dhidden, gate, up, d_gate, d_up, n, F, ld_dh, ld_gate, ld_up):
    dh, g, u = (_strided_rows(a, n, F, ld) for a, ld in ((dhidden, ld_dh), (gate, ld_gate), (up, ld_up)))
    sig = 1 / (1 + np.exp(-g))
    memory(d_up, n)[:] = dh * g * sig
    memory(d_gate, n)[:] = dh * u * sig * (1 + g * (1 - sig))


def emu_causal_softmax_forward(grid, block, scores, probs, S, GT, Tq, first_pos):
    R = grid[0]
    sc = _f64(memory(scores, R * S)).reshape(R, S)
    last = np.minimum(S - 1, first_pos + (np.arange(R) % GT) % Tq)
    visible = np.arange(S)[None, :] <= last[:, None]
    m = np.where(visible, sc, -np.inf).max(1, keepdims=True)
    e = np.where(visible, np.exp(np.where(visible, sc - m, 0)), 0)
    memory(probs, R * S)[:] = (e / e.sum(1, keepdims=True)).reshape(-1)


def emu_causal_softmax_backward(grid, block, dprobs, probs, dscores, S):
    R = grid[0]
    dp, p = _f64(memory(dprobs, R * S)).reshape(R, S), _f64(memory(probs, R * S)).reshape(R, S)
    memory(dscores, R * S)[:] = (p * (dp - (p * dp).sum(1, keepdims=True))).reshape(-1)


def emu_cross_entropy_forward(grid, block, logits, targets, log_z, row_loss, V, z_loss):
    N = grid[0]
    L, t = _f64(memory(logits, N * V)).reshape(N, V), memory(targets, N)
    m = L.max(1)
    lz = np.log(np.exp(L - m[:, None]).sum(1)) + m
    memory(log_z, N)[:], memory(row_loss, N)[:] = lz, lz - L[np.arange(N), t] + z_loss * lz * lz


def emu_cross_entropy_backward(grid, block, logits, targets, log_z, dlogits, V, z_loss, inv_n, row_weight):
    N = grid[0]
    L, t, lz = _f64(memory(logits, N * V)).reshape(N, V), memory(targets, N), _f64(memory(log_z, N))[:, None]
    w = np.full((N, 1), np.float64(inv_n)) if row_weight is None else _f64(memory(row_weight, N))[:, None]
    d = np.exp(L - lz) * (1 + 2 * np.float64(z_loss) * lz) * w
    d[np.arange(N), t] -= w[:, 0]
    memory(dlogits, N * V)[:] = d.reshape(-1)


def emu_embedding_backward(grid, block, d_embed, dx, tokens, n, D):
    tok = memory(tokens, n // D)
    i = np.arange(n)
    np.add.at(memory(d_embed, (tok.max() + 1) * D), tok[i // D] * D + i % D, _f64(memory(dx, n)))


def emu_dropout_mask(grid, block, keep, n, first, key, threshold):
    h = (np.arange(n, dtype=np.uint32) + np.uint32(first)) * np.uint32(0x9E3779B1) + np.uint32(key)
    memory(keep, n)[:] = ops._mix32(np, h) >= threshold


def emu_dropout_apply(grid, block, x, keep, y, n, scale):
    memory(y, n)[:] = np.where(memory(keep, n), _f64(memory(x, n)) * scale, 0.0)


def emu_sum_squares(grid, block, g, n, sum_sq):
    memory(sum_sq, 1)[0] += (_f64(memory(g, n)) ** 2).sum()


def emu_sqrt_to_float(grid, block, sum_sq, norm):
    memory(norm, 1)[0] = np.sqrt(memory(sum_sq, 1)[0])


def emu_adamw_flat(grid, block, p, g, m, v, decay, frozen, p_compute, grad_norm, n, lr, beta1, beta2, eps,
                   weight_decay, step_size, v_correction, max_norm):
    scale = 1.0
    if grad_norm is not None and max_norm > 0 and memory(grad_norm, 1)[0] > max_norm:
        scale = max_norm / (np.float64(memory(grad_norm, 1)[0]) + 1e-6)
    live = np.ones(n, bool) if frozen is None else memory(frozen, n) == 0
    gi = _f64(memory(g, n)) * scale
    new_m = beta1 * _f64(memory(m, n)) + (1 - beta1) * gi
    new_v = beta2 * _f64(memory(v, n)) + (1 - beta2) * gi * gi
    new_p = _f64(memory(p, n))
    if decay is not None:
        new_p = np.where(memory(decay, n) != 0, new_p * (1 - lr * weight_decay), new_p)
    new_p -= step_size * new_m / (np.sqrt(new_v / v_correction) + eps)
    for buf, new in ((m, new_m), (v, new_v), (p, new_p)) + (((p_compute, new_p),) if p_compute is not None else ()):
        memory(buf, n)[live] = new[live]


def _heads(a, BH, Hkv, T, GT, DH, token=None):
    """A (B, T, H, DH) array's memory as the kernels see it, its tokens `token` elements apart (H DH: contiguous):
    (BH, GT, DH), a kv head's G query heads stacked."""
    B, G = BH // Hkv, GT // T
    H = Hkv * G
    token = token or H * DH
    tokens = as_strided(memory(a, (B * T - 1) * token + H * DH), shape=(B, T, H, DH),
                        strides=tuple(a.itemsize * s for s in (T * token, token, DH, 1)))
    return _f64(tokens).reshape(B, T, Hkv, G, DH).transpose(0, 2, 3, 1, 4).reshape(BH, GT, DH)


def _store_heads(a, x, Hkv, T):
    """x (BH, GT, DH) into a's (B, T, H, DH) memory."""
    BH, GT, DH = x.shape
    B, G = BH // Hkv, GT // T
    memory(a, x.size)[:] = x.reshape(B, Hkv, G, T, DH).transpose(0, 3, 1, 2, 4).reshape(-1)


def _flash_inputs(grid, q, k, v, GT, T, S, Hkv):
    # q (BH, GT, DH) from its (B, T, H, DH) memory, k and v (BH, S, DH); DH is the template argument
    BH = grid[1]
    DH = q.size // (BH * GT)
    K, V = (_f64(memory(x, BH * S * DH)).reshape(BH, S, DH) for x in (k, v))
    return BH, DH, _heads(q, BH, Hkv, T, GT, DH), K, V


def _flash_probs(Q, K, GT, T, S, first_pos, scale):
    # p (BH, GT, S) and the log-sum-exp (BH, GT) of the causal scaled scores, row r being query r % T
    scores = scale * Q @ K.transpose(0, 2, 1)
    allowed = np.arange(S)[None, :] <= np.minimum(S - 1, first_pos + np.arange(GT) % T)[:, None]
    scores = np.where(allowed, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(scores - top).sum(-1))
    return np.exp(scores - lse[..., None]), lse


def emu_flash_forward(grid, block, q, k, v, out, lse, GT, T, S, first_pos, Hkv, scale):
    assert grid[0] * 64 >= GT and block == (128,)
    BH, DH, Q, K, V = _flash_inputs(grid, q, k, v, GT, T, S, Hkv)
    p, L = _flash_probs(Q, K, GT, T, S, first_pos, scale)
    _store_heads(out, p @ V, Hkv, T)
    memory(lse, BH * GT)[:] = L.reshape(-1)


def _flash_dscores(grid, q, k, v, dout, lse, delta, GT, T, S, first_pos, Hkv, scale):
    BH, DH, Q, K, V = _flash_inputs(grid, q, k, v, GT, T, S, Hkv)
    p, L = _flash_probs(Q, K, GT, T, S, first_pos, scale)
    np.testing.assert_allclose(L, _f64(memory(lse, BH * GT)).reshape(BH, GT), rtol=1e-5)   # the forward's
    dO = _f64(memory(dout, BH * GT * DH)).reshape(BH, GT, DH)                               # stacked by prep
    ds = p * (dO @ V.transpose(0, 2, 1) - _f64(memory(delta, BH * GT)).reshape(BH, GT, 1))
    return BH, DH, Q, K, dO, p, ds


def emu_flash_backward_dq(grid, block, q, k, v, dout, lse, delta, dq, GT, T, S, first_pos, Hkv, scale):
    assert grid[0] * 64 >= GT and block == (128,)
    BH, DH, Q, K, dO, p, ds = _flash_dscores(grid, q, k, v, dout, lse, delta, GT, T, S, first_pos, Hkv, scale)
    _store_heads(dq, scale * ds @ K, Hkv, T)


def emu_flash_backward_dkdv(grid, block, q, k, v, dout, lse, delta, dk_part, dv_part, GT, T, S, first_pos, Hkv,
                            scale, chunk_rows):
    assert grid[0] * 64 >= S and chunk_rows % 32 == 0 and grid[2] * chunk_rows >= GT and block == (128,)
    BH, DH, Q, K, dO, p, ds = _flash_dscores(grid, q, k, v, dout, lse, delta, GT, T, S, first_pos, Hkv, scale)
    n = grid[2] * BH * S * DH
    dk, dv = memory(dk_part, n).reshape(grid[2], BH, S, DH), memory(dv_part, n).reshape(grid[2], BH, S, DH)
    for z in range(grid[2]):
        rows = slice(z * chunk_rows, (z + 1) * chunk_rows)
        dv[z] = p[:, rows].transpose(0, 2, 1) @ dO[:, rows]
        dk[z] = scale * ds[:, rows].transpose(0, 2, 1) @ Q[:, rows]


def byte_memory(a, n):
    """The n bytes from a's first element, writeable (a kernel's void* argument; n a multiple of a.itemsize)."""
    return memory(a, n // a.itemsize).view(np.uint8)


def emu_copy_rows(grid, block, src, src_stride, dst, dst_stride, rows, row_bytes):
    S = as_strided(byte_memory(src, (rows - 1) * src_stride + row_bytes), (rows, row_bytes), (src_stride, 1))
    D = as_strided(byte_memory(dst, (rows - 1) * dst_stride + row_bytes), (rows, row_bytes), (dst_stride, 1),
                   writeable=True)
    D[...] = S


def emu_flash_backward_prep(grid, block, dout, token, out, dout_g, delta, rows, T, Hkv, G):
    assert grid[0] * 4 >= rows and block == (128,)
    DH, BH = out.size // rows, rows // (G * T)
    stacked = _heads(dout, BH, Hkv, T, G * T, DH, token).reshape(rows, DH)   # dout: a column slice
    memory(dout_g, rows * DH)[:] = stacked.reshape(-1)                        # bf16 values: exact
    memory(delta, rows)[:] = (stacked * _heads(out, BH, Hkv, T, G * T, DH).reshape(rows, DH)).sum(-1)


def emu_flash_sum_chunks(grid, block, dk_part, dv_part, dk, dv, chunks, n, S, Hkv, DH):
    BH = n // (S * DH)
    for part, total in ((dk_part, dk), (dv_part, dv)):
        summed = _f64(memory(part, chunks * n)).reshape(chunks, BH // Hkv, Hkv, S, DH).sum(0)
        memory(total, n)[:] = summed.transpose(0, 2, 1, 3).reshape(-1)


class EmulatedKernels:
    """Plays source.kernel(name, instance): checks each launch against the C signature, then emulates it."""

    def __init__(self):
        self.launched = set()

    def kernel(self, name, instance):
        assert instance in source.KERNELS[name], f"{instance} is launched but {name}.cu does not compile it"
        kernel_name = instance.split("<")[0]
        tparams, params = SIGNATURES[kernel_name]
        targs = [a.strip() for a in instance[len(kernel_name) + 1:-1].split(",")] if "<" in instance else []
        bind = dict(zip(tparams, targs))

        def launch(grid, block, args):
            assert isinstance(grid, tuple) and isinstance(block, tuple) and all(g >= 1 for g in grid + block)
            assert len(args) == len(params), (instance, len(args), len(params))
            emulated = []
            for k, (arg, (base, pointer)) in enumerate(zip(args, params)):
                want = C_TYPES[bind.get(base, base)]
                if pointer:
                    if isinstance(arg, np.uint64):                       # a null pointer
                        assert arg == 0, (instance, k)
                        emulated.append(None)
                        continue
                    assert isinstance(arg, np.ndarray), (instance, k, type(arg))
                    assert want is None or arg.dtype.name == want, (instance, k, arg.dtype, want)
                else:
                    assert type(arg) is np.dtype(want).type, (instance, k, type(arg), want)
                emulated.append(arg)
            self.launched.add(instance)
            globals()[f"emu_{kernel_name}"](grid, block, *emulated)
        return launch


@pytest.fixture
def emulated(monkeypatch):
    kernels = EmulatedKernels()
    monkeypatch.setattr(cuda_ops, "_cupy", lambda: np)
    monkeypatch.setattr(cuda_ops, "kernel", kernels.kernel)
    monkeypatch.setattr(gemm_module, "_cupy", lambda: np)
    monkeypatch.setattr(gemm_module, "_cublas_gemm", fake_cublas_gemm)
    return kernels


def test_every_kernel_signature_is_read():
    names = {instance.split("<")[0] for instances in source.KERNELS.values() for instance in instances}
    assert names == set(SIGNATURES)
    assert all(f"emu_{name}" in globals() for name in names)


def test_gpucheck_kernel_comparisons_pass_with_emulated_kernels(emulated):
    from tinypalm.gpucheck import KernelChecks
    results = KernelChecks(np, seed=1, max_size=3e6).run()
    results = [r for r in results if r.name != "bfloat16"]        # ml_dtypes may be missing here; not on a GPU
    failures = [str(r) for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert len(results) >= 60
    launched = {instance.split("<")[0] for instance in emulated.launched}
    assert launched == set(SIGNATURES)                             # every kernel ran


def aligned(shape, dtype, offset=0):
    """A zeroed array whose first element lies `offset` bytes past a 256-byte boundary (as CuPy allocates)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 512, np.uint8)
    start = -raw.ctypes.data % 256 + offset
    return raw[start:start + n].view(dtype).reshape(shape)


@pytest.mark.parametrize("widths, dtype, offset, units", [
    ((16, 8, 8), "bfloat16", 0, {"uint4"}),                      # the fused projection's case: 16-byte multiples
    ((16, 8, 8), "bfloat16", 2, {"unsigned short", "uint4"}),    # the first part 2 bytes off a 16-byte boundary
    ((3, 5), "bfloat16", 0, {"unsigned short"}),                 # odd widths
    ((3, 5), "float32", 0, {"unsigned int"})])
def test_concat_columns_copies_in_the_widest_unit_the_bytes_allow(emulated, widths, dtype, offset, units):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(0)
    N = 5
    wide = aligned((N, widths[0] + 8), dtype, offset)          # the first part a column slice 8 elements in
    wide[...] = rng.standard_normal(wide.shape)
    parts = [wide[:, 8:]] + [rng.standard_normal((N, w)).astype(dtype) for w in widths[1:]]
    got = cuda_ops.concat_columns(np, parts)
    np.testing.assert_array_equal(got, np.concatenate(parts, axis=1))
    assert {i for i in emulated.launched if i.startswith("copy_rows")} == {f"copy_rows<{u}>" for u in units}


def test_a_wrong_argument_width_is_caught(emulated):
    launch = emulated.kernel("embedding", "embedding_backward<float>")
    d_embed, dx, tokens = np.zeros((5, 4), np.float32), np.ones((3, 4), np.float32), np.array([0, 1, 1])
    with pytest.raises(AssertionError):
        launch((1,), (256,), (d_embed, dx, tokens, np.int32(12), np.int32(4)))       # n is long long
    with pytest.raises(AssertionError):
        launch((1,), (256,), (d_embed, dx, tokens.astype(np.int32), np.int64(12), np.int32(4)))   # tokens int64
    launch((1,), (256,), (d_embed, dx, tokens, np.int64(12), np.int32(4)))
    np.testing.assert_array_equal(d_embed, [[1] * 4, [2] * 4, [0] * 4, [0] * 4, [0] * 4])


def test_the_model_on_kernel_backed_ops_matches_float64(emulated, monkeypatch):
    # the model as the cupy backend builds it (ops.py with the overrides laid over it), numpy playing cupy:
    # loss and every gradient against the plain float64 model, with dropout, and generation with the KV cache
    import types
    from tinypalm import Config, PaLM
    from tinypalm.backend import cuda_overrides, get_ops
    cfg = Config(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    ref, model = PaLM(cfg, "numpy", "float64", seed=2), PaLM(cfg, "numpy", "float32", seed=2)
    model.ops = types.SimpleNamespace(**{**vars(get_ops("numpy")), **cuda_overrides()})
    model._masks.clear()
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 40, (3, 12)), rng.integers(0, 40, (3, 12))
    loss_ref, grads_ref = ref.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=4)
    loss, grads = model.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=4)
    assert abs(loss - loss_ref) < 1e-5 * abs(loss_ref)
    for name in grads_ref:
        assert np.linalg.norm(grads[name] - grads_ref[name]) <= 1e-4 * np.linalg.norm(grads_ref[name]), name
    cache = model.new_kv_cache(3)
    stepwise = np.concatenate([model.forward(tokens[:, :5], cache)] +
                              [model.forward(tokens[:, t:t + 1], cache) for t in range(5, 12)], axis=1)
    np.testing.assert_allclose(stepwise, ref.forward(tokens), rtol=1e-4, atol=1e-4)
    # instruction tuning's loss: the mean over the positions a mask counts
    mask = rng.random((3, 12)) < 0.4
    masked_ref, masked_grads_ref = ref.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=4, loss_mask=mask)
    masked, masked_grads = model.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=4, loss_mask=mask)
    assert abs(masked - masked_ref) < 1e-5 * abs(masked_ref) and abs(masked - loss_ref) > 1e-3
    for name in masked_grads_ref:
        assert (np.linalg.norm(masked_grads[name] - masked_grads_ref[name])
                <= 1e-4 * np.linalg.norm(masked_grads_ref[name])), name
    launched = {instance.split("<")[0] for instance in emulated.launched}
    assert {"layernorm_forward", "rope", "causal_softmax_forward", "causal_softmax_backward", "swiglu_backward",
            "cross_entropy_backward", "embedding_backward", "dropout_mask", "dropout_apply"} <= launched
    # a frozen embedding, weight and gains: their gradients skipped, the others' as before
    frozen = frozenset({"embed", "layers.0.w_in", "layers.1.norm", "norm"})
    products = []
    monkeypatch.setattr(gemm_module, "_cublas_gemm", lambda *args: (products.append(args), fake_cublas_gemm(*args)))
    model.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=4)
    unfrozen_products, products[:] = len(products), []
    model.frozen = frozen
    _, frozen_grads = model.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=4)
    pieces = len(batch_threads.pieces(len(tokens)))
    assert len(products) == unfrozen_products - 2 * pieces          # no w_in and no tied-embedding gradient product
    for name, g in frozen_grads.stored.items():
        if name in frozen:
            assert not g.any(), name
        else:
            np.testing.assert_allclose(g, grads.stored[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_adamw_flat_matches_optim_adamw(emulated):
    # optim.AdamW on the model's flat buffers (decay runs, a frozen array) against adamw_flat with its ranges,
    # clipping included: clip_grad_norm scales g on the host, adamw_flat on the device from global_grad_norm
    from tinypalm import Config, PaLM
    from tinypalm.optim import AdamW, clip_grad_norm
    cfg = Config(vocab_size=30, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=8)
    model, twin_model = PaLM(cfg, "numpy", "float32", seed=1), PaLM(cfg, "numpy", "float32", seed=1)
    frozen = ["embed"]
    opt, twin_opt = AdamW(model.params, frozen=frozen), AdamW(twin_model.params, frozen=frozen)
    n = model.params.flat.size
    decay, frozen_ranges = cuda_ops.adamw_ranges(opt.runs, n)
    assert frozen_ranges == [model.params.layout.spans["embed"]] and decay
    rng = np.random.default_rng(0)
    for t in (1, 2, 3):
        tokens, targets = rng.integers(0, 30, (2, 8)), rng.integers(0, 30, (2, 8))
        _, grads = twin_model.loss_and_grads(tokens, targets)
        g = grads.flat.copy()
        max_norm = 0.5 * float(np.linalg.norm(g))                 # so that clipping acts
        clip_grad_norm(grads, max_norm)
        twin_opt.step(twin_model.params, grads, lr=1e-2)
        norm = cuda_ops.global_grad_norm(g)
        np.testing.assert_allclose(norm, np.linalg.norm(g.astype(np.float64)), rtol=1e-6)
        cuda_ops.adamw_flat(model.params.flat, g, opt.m.flat, opt.v.flat, decay, 1e-2, opt.beta1, opt.beta2,
                            opt.eps, opt.weight_decay, t, frozen=frozen_ranges, grad_norm=norm, max_norm=max_norm)
        # the same weights on both sides, so the next step's gradients agree too
        np.testing.assert_allclose(model.params.flat, twin_model.params.flat, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.v.flat, twin_opt.v.flat, rtol=1e-5, atol=1e-12)


def test_gpucheck_model_check_runs_with_emulated_kernels(emulated, monkeypatch):
    # gpucheck's model section, numpy playing cupy: float32 passes, and it says whether the kernels were in use
    import types
    from tinypalm import gpucheck, model
    from tinypalm.backend import cuda_overrides, get_ops
    monkeypatch.setattr(model, "get_xp", lambda backend: np)
    monkeypatch.setattr(model, "get_ops", lambda backend: types.SimpleNamespace(
        **{**vars(get_ops("numpy")), **(cuda_overrides() if backend == "cupy" else {})}))
    results = {r.name: r for r in gpucheck.check_model()}
    assert results["model float32 loss"].ok and "in use" in results["model float32 loss"].detail
    assert results["model float32 every gradient"].ok
    assert all(r.ok for name, r in results.items() if "float32" in name)
    # sample.py's bf16 model, its weights alone in bf16, computes what the model with a float32 master computes
    assert results["model bfloat16 without a master (sampling)"].ok, results["model bfloat16 without a master (sampling)"]


def test_gpucheck_training_verdict():
    from tinypalm.gpucheck import training_verdict
    falling = [{"split": "train", "step": 5 * i, "loss": 6.0 - 0.3 * i, "tokens_per_s": 1e5} for i in range(1, 8)]
    assert training_verdict(falling + [{"split": "val", "step": 35, "loss": 9.0}], 120, "").ok
    flat = [dict(r, loss=6.0) for r in falling]
    assert not training_verdict(flat, 120, "").ok
    diverged = falling[:-1] + [dict(falling[-1], loss=float("nan"))]
    assert not training_verdict(diverged, 120, "").ok
    verdict = training_verdict(falling[:2], 120, "model: ...\nerror: --dtype bfloat16 is not a choice")
    assert not verdict.ok and "not a choice" in verdict.detail


# --- on a GPU: every kernel against its twin --------------------------------------------------------------------

def _has_gpu():
    try:
        import cupy
        return cupy.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_kernels_match_their_twins_on_a_gpu():
    from tinypalm import gpucheck
    failures = [r for r in gpucheck.check_kernels() if not r.ok]
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU; gpucheck runs there instead of refusing")
def test_gpucheck_without_a_gpu_says_so_in_one_line():
    import subprocess
    import sys
    from test_cli import assert_user_error
    r = subprocess.run([sys.executable, "-m", "tinypalm.gpucheck"], capture_output=True, text=True, timeout=120)
    assert_user_error(r, "gpucheck needs", "GPU", "on a machine with one")
    assert "--backend numpy" not in r.stderr                   # gpucheck has no such flag
    r = subprocess.run([sys.executable, "-m", "tinypalm.gpucheck", "--train-seconds", "-1"], capture_output=True,
                       text=True, timeout=120)
    assert_user_error(r, "--train-seconds must not be negative")


def test_optim_adamw_takes_the_one_launch_kernel_where_the_backend_has_it(emulated, monkeypatch):
    # the wiring of optim.AdamW to adamw_flat: with the kernel offered (as on a GPU), AdamW.step launches it once
    # per step and gives what its own array passes give
    from tinypalm import Config, PaLM, backend
    from tinypalm.optim import AdamW
    launches = []

    def offered(flat, runs):
        decay, frozen = cuda_ops.adamw_ranges(runs, flat.size)

        def step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
            launches.append(t)
            cuda_ops.adamw_flat(p, g, m, v, decay, lr, beta1, beta2, eps, weight_decay, t, frozen=frozen or None)
        return step
    assert backend.fused_adamw(np.zeros(4, np.float32), [(0, 4, True)]) is None      # numpy: the array passes
    cfg = Config(vocab_size=30, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=8)
    model, twin = PaLM(cfg, "numpy", "float32", seed=1), PaLM(cfg, "numpy", "float32", seed=1)
    twin_opt = AdamW(twin.params, frozen=["embed"])
    monkeypatch.setattr(backend, "fused_adamw", offered)
    opt = AdamW(model.params, frozen=["embed"])
    assert opt.fused is not None and twin_opt.fused is None
    rng = np.random.default_rng(0)
    for t in (1, 2):
        tokens = rng.integers(0, 30, (2, 8))
        _, grads = model.loss_and_grads(tokens, tokens)
        opt.step(model.params, grads, lr=1e-2)
        twin_opt.step(twin.params, grads, lr=1e-2)
        np.testing.assert_allclose(model.params.flat, twin.params.flat, rtol=1e-5, atol=1e-6)
    assert launches == [1, 2]
