"""Row-major GEMMs through cuBLAS: out = alpha * op(a) @ op(b) + beta * out, batched over the leading axes.

cupy.matmul cannot serve attention: with more than two dimensions it raises TypeError on bfloat16 and upcasts
float16, and it copies transposed views. cuBLAS's gemmStridedBatchedEx takes the transposes, row strides and batch
strides as arguments, accumulates in float32, may write a float32 result from bf16 inputs (weight gradients go
straight into the float32 gradient buffer, beta = 1 accumulating), and takes the scale as alpha.

cuBLAS is column-major. A row-major matrix with row stride ld, read column-major with the same ld, is its
transpose. So the row-major product C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T: cuBLAS gets b as
its first operand and a as its second, each with its own transpose flag, and m, n are the row-major N, M.
`gemm_args` does that mapping in plain Python (checked on the CPU against numpy); `gemm` makes the call.
"""

import math
import os

import numpy
from typing import NamedTuple


class Layout(NamedTuple):
    """An operand as cuBLAS reads it: `batch` matrices of rows x cols (row-major), row stride `ld` and batch
    stride `stride`, both in elements."""
    batch: int
    rows: int
    cols: int
    ld: int
    stride: int


def matrix_layout(shape, strides, itemsize):
    """The Layout of an array (..., rows, cols) with these byte strides, or None when cuBLAS cannot read it as it
    is: each row must be contiguous, the rows evenly spaced and not overlapping, and the leading axes must
    collapse into one evenly spaced batch axis."""
    if len(shape) < 2:
        return None
    rows, cols = shape[-2:]
    row_stride, col_stride = strides[-2:]
    if cols > 1 and col_stride != itemsize:
        return None
    if rows > 1:
        if row_stride % itemsize or row_stride < cols * itemsize:
            return None
        ld = row_stride // itemsize
    else:
        ld = cols
    batch, stride, expect = 1, None, None
    for n, st in zip(reversed(shape[:-2]), reversed(strides[:-2])):
        if n == 1:
            continue
        if stride is None:
            if st % itemsize or st < 0:
                return None
            stride = st
        elif st != expect:
            return None
        expect = st * n
        batch *= n
    stride = rows * ld if stride is None else stride // itemsize
    return Layout(batch, rows, cols, max(ld, 1), stride)


def gemm_args(la, lb, lc, transa, transb):
    """The gemmStridedBatched arguments for row-major c = op(a) @ op(b), from the three operands' Layouts.

    Returns a dict: op_first/op_second ("N" or "T") for cuBLAS's first operand (b) and second (a), m, n, k, their
    leading dimensions and batch strides, ldc, stride_c and the batch count."""
    M, K = (la.cols, la.rows) if transa else (la.rows, la.cols)
    Kb, N = (lb.cols, lb.rows) if transb else (lb.rows, lb.cols)
    if K != Kb or (lc.rows, lc.cols) != (M, N):
        raise ValueError(f"gemm: op(a) is {M}x{K}, op(b) {Kb}x{N}, out {lc.rows}x{lc.cols}")
    for name, lay in (("a", la), ("b", lb)):
        if lay.batch not in (1, lc.batch):
            raise ValueError(f"gemm: {name} has {lay.batch} matrices, out {lc.batch}")
    return dict(op_first="T" if transb else "N", op_second="T" if transa else "N", m=N, n=M, k=K,
                ld_first=lb.ld, stride_first=lb.stride if lb.batch > 1 else 0,
                ld_second=la.ld, stride_second=la.stride if la.batch > 1 else 0,
                ldc=lc.ld, stride_c=lc.stride, batch=lc.batch)


def _layout(a):
    return matrix_layout(a.shape, a.strides, a.itemsize)


def _cupy():
    import cupy
    return cupy


def gemm(a, b, transa=False, transb=False, alpha=1.0, beta=0.0, out=None, out_dtype=None):
    """Row-major out = alpha * op(a) @ op(b) + beta * out on the GPU, op(x) = x^T (last two axes) when trans*.

    a (..., M, K) or (..., K, M), b (..., K, N) or (..., N, K), same leading axes (or none for a shared operand);
    a and b of one dtype (float32 or bfloat16), accumulated in float32. out (..., M, N): given (beta = 1
    accumulates into it), or new, of out_dtype (default a's dtype). No host synchronisation."""
    from .source import ctype
    cp = _cupy()
    if a.dtype != b.dtype or ctype(a.dtype) is None:
        raise TypeError(f"gemm: a and b must share a float32 or bfloat16 dtype, got {a.dtype} and {b.dtype}")
    a, b = readable(a), readable(b)
    M = a.shape[-1] if transa else a.shape[-2]
    N = b.shape[-2] if transb else b.shape[-1]
    lead = a.shape[:-2] if math.prod(a.shape[:-2]) >= math.prod(b.shape[:-2]) else b.shape[:-2]
    if out is None:
        out = cp.empty(lead + (M, N), dtype=out_dtype or a.dtype)
    lc = _layout(out)
    if lc is None or ctype(out.dtype) is None:
        raise ValueError("gemm: out must be a float32 or bfloat16 array with contiguous rows")
    args = gemm_args(_layout(a), _layout(b), lc, transa, transb)
    _cublas_gemm(args, alpha, beta, b, a, out)
    return out


def _cublas_gemm(args, alpha, beta, first, second, out):
    # cublasGemmStridedBatchedEx on CuPy's handle and current stream; alpha and beta as host float32 scalars
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas
    cp = _cupy()
    cuda_type = {"float32": runtime.CUDA_R_32F, "bfloat16": runtime.CUDA_R_16BF}
    op = {"N": cublas.CUBLAS_OP_N, "T": cublas.CUBLAS_OP_T}
    fast_tf32 = first.dtype.name == "float32" and os.environ.get("CUPY_TF32", "0") == "1"
    compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if fast_tf32 else cublas.CUBLAS_COMPUTE_32F
    alpha_host, beta_host = numpy.array(alpha, numpy.float32), numpy.array(beta, numpy.float32)
    cublas.gemmStridedBatchedEx(
        cp.cuda.device.get_cublas_handle(), op[args["op_first"]], op[args["op_second"]],
        args["m"], args["n"], args["k"], alpha_host.ctypes.data,
        first.data.ptr, cuda_type[first.dtype.name], args["ld_first"], args["stride_first"],
        second.data.ptr, cuda_type[second.dtype.name], args["ld_second"], args["stride_second"],
        beta_host.ctypes.data, out.data.ptr, cuda_type[out.dtype.name], args["ldc"], args["stride_c"],
        args["batch"], compute, cublas.CUBLAS_GEMM_DEFAULT)


def readable(a):
    """a itself when cuBLAS can read it in place, else a C-contiguous copy."""
    return a if _layout(a) is not None else _cupy().ascontiguousarray(a)
