"""The CUDA kernels without a GPU: every kernel compiles for sm_80 and sm_90 through NVRTC (CuPy's bindings, the
NVRTC wheel of the `test` extra), and the pure-Python parts around them are checked against numpy.

What needs a GPU (each kernel against its ops.py twin, the model on cupy against numpy) is in tinypalm.gpucheck;
the last test here runs its kernel comparisons when a GPU is present."""

import inspect

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from tinypalm import ops
from tinypalm.cuda import ops as cuda_ops
from tinypalm.cuda import source
from tinypalm.cuda.gemm import gemm_args, matrix_layout

ARCHS = ("sm_80", "sm_90")


# --- compilation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(source.KERNELS))
def test_kernel_compiles_to_machine_code(name, arch):
    cubin, lowered = source.compile_cubin(name, arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000          # a cubin: ptxas ran for this architecture
    assert set(lowered) == set(source.KERNELS[name])               # every instance the wrappers launch exists
    for instance, mangled in lowered.items():
        assert mangled.encode() in cubin, instance


def test_a_machine_code_error_fails_the_compile(monkeypatch):
    # an inline-PTX typo (.f33) passes a PTX-only compile; a real sm_XX target runs ptxas, which rejects it
    bad = source.kernel_source("embedding") + (
        '\n__global__ void typo(float* x) { asm("add.f33 %0, %0, %0;" : "+f"(x[0])); }\n')
    monkeypatch.setattr(source, "kernel_source", lambda name: bad)
    with pytest.raises(RuntimeError, match="embedding.cu for sm_90"):
        source.compile_cubin("embedding", "sm_90")


def test_a_syntax_error_is_reported_with_the_compiler_log(monkeypatch):
    monkeypatch.setattr(source, "kernel_source", lambda name: "__global__ void broken( {}")
    with pytest.raises(RuntimeError, match="error"):
        source.compile_cubin("embedding", "sm_80")


def test_cuda_headers_are_found():
    import os
    assert os.path.exists(os.path.join(source.cuda_include_dir(), "cuda_bf16.h"))


def test_overrides_have_exactly_the_signatures_of_the_ops_they_replace():
    assert len(cuda_ops.OVERRIDES) >= 18
    for name, fn in cuda_ops.OVERRIDES.items():
        assert inspect.signature(fn) == inspect.signature(getattr(ops, name)), name


# --- the GEMM argument mapping, run through a column-major cuBLAS written in numpy -----------------------------

def fake_gemm_strided_batched(args, alpha, beta, buf_first, off_first, buf_second, off_second, buf_c, off_c):
    """cublasGemmStridedBatchedEx's definition, column-major: C_i = alpha op(A_i) op(B_i) + beta C_i, where the
    first operand A lives in buf_first and the second, B, in buf_second (flat arrays; offsets in elements)."""
    s = buf_c.itemsize

    def colmajor(buf, off, rows, cols, ld):
        return as_strided(buf[off:], shape=(rows, cols), strides=(s, ld * s), writeable=True)

    m, n, k = args["m"], args["n"], args["k"]
    for i in range(args["batch"]):
        shape_a = (m, k) if args["op_first"] == "N" else (k, m)
        shape_b = (k, n) if args["op_second"] == "N" else (n, k)
        A = colmajor(buf_first, off_first + i * args["stride_first"], *shape_a, args["ld_first"])
        B = colmajor(buf_second, off_second + i * args["stride_second"], *shape_b, args["ld_second"])
        C = colmajor(buf_c, off_c + i * args["stride_c"], m, n, args["ldc"])
        opA = A if args["op_first"] == "N" else A.T
        opB = B if args["op_second"] == "N" else B.T
        C[...] = alpha * (opA @ opB) + beta * C


def view_in_buffer(rng, shape, make_view):
    """(flat buffer, view): make_view turns a fresh random array into the operand; the view lives in the buffer."""
    base = rng.standard_normal(shape)
    view = make_view(base)
    offset = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // base.itemsize
    return base.reshape(-1), view, offset


def cpu_gemm(a_spec, b_spec, c_spec, transa, transb, alpha, beta, rng):
    buf_a, a, off_a = view_in_buffer(rng, *a_spec)
    buf_b, b, off_b = view_in_buffer(rng, *b_spec)
    buf_c, c, off_c = view_in_buffer(rng, *c_spec)
    expected = alpha * np.matmul(np.swapaxes(a, -1, -2) if transa else a,
                                 np.swapaxes(b, -1, -2) if transb else b) + beta * c
    la, lb, lc = (matrix_layout(x.shape, x.strides, x.itemsize) for x in (a, b, c))
    assert None not in (la, lb, lc)
    args = gemm_args(la, lb, lc, transa, transb)
    fake_gemm_strided_batched(args, alpha, beta, buf_b, off_b, buf_a, off_a, buf_c, off_c)   # b first, as gemm does
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
    a = np.zeros((3, 4, 5))[:, ::2]                                # rows not evenly spaced over both leading axes
    assert cuda_ops.row_layout(a.shape, a.strides, 8, 2) == (6, 5, 10)
    b = np.zeros((3, 4, 5))[:, :3]
    assert cuda_ops.row_layout(b.shape, b.strides, 8, 2) is None


# --- the dropout mask's host half: with it, the kernel's formula reproduces ops.dropout_mask bit for bit ---------

@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 987654321987])
def test_dropout_key_and_formula_match_the_twin(seed):
    key_array = ops._mix32(np, np.asarray([seed & 0xFFFFFFFF], dtype=np.uint32))
    assert cuda_ops.mix32(seed) == int(key_array[0])
    for rate, shape in [(0.1, (7, 13)), (0.5, (3, 4, 5)), (0.0, (9,)), (0.999, (64,))]:
        key, threshold = cuda_ops.dropout_key_threshold(rate, seed)
        i = np.arange(np.prod(shape), dtype=np.uint32)
        # the kernel: keep[i] = mix32((uint32)i * 0x9E3779B1 + key) >= threshold, in wrapping uint32 arithmetic
        h = i * np.uint32(0x9E3779B1) + np.uint32(key)
        keep = np.array([cuda_ops.mix32(int(x)) for x in h]) >= threshold
        np.testing.assert_array_equal(keep.reshape(shape), ops.dropout_mask(np, shape, rate, seed))


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
    assert_user_error(r, "gpucheck needs", "GPU")
