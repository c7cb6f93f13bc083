"""Faster twins of ops.py functions for the numpy backend: the same math, cut into chunks that run on all cores.

Why. numpy runs element-wise work on one core, and its BLAS (OpenBLAS) splits each matmul over all cores
with threads that spin at a barrier until every one of them is done. On an idle machine that is fine; when
another program holds a core, every small matmul waits for the descheduled thread (the attention's batched
matmuls made training 20x slower). Here BLAS runs single-threaded, and a small pool of persistent threads
(`ChunkPool`) takes an operation cut into row chunks and hands the chunks out one at a time: a thread that
loses its core just takes fewer chunks. numpy and BLAS release the GIL while they compute, so the threads
really run in parallel. A chunk stays in the cache while an element-wise op makes its several passes over it,
so they cost one trip to memory. The pool has one thread per core the process may use; TINYPALM_NUM_THREADS=n
sets it (1: everything on the calling thread).

Each function has exactly the signature and the cache format of its ops.py twin (so a twin's backward also
accepts the plain forward's cache) and is tested against it (tests/test_cpu_ops.py). Inputs these twins do
not handle (any dtype other than float32 and float64, e.g. bfloat16) go to the ops.py function unchanged.
"""

import contextvars
import itertools
import math
import os
import threading
import time

import numpy as np

from . import ops
from .errors import TinyPalmError

HANDLED = (np.dtype(np.float32), np.dtype(np.float64))
ELEMENTWISE_CHUNK_BYTES = 1 << 20         # one array's share of a chunk; larger: fewer GIL hand-overs between threads
GEMM_CHUNK_FLOPS = 16_000_000             # at least this much multiply-add work per matmul chunk (~0.3 ms)
GEMM_MIN_CHUNKS = 4
GEMM_MAX_CHUNK_FLOPS = 160_000_000        # at most ~3 ms of one core's work per piece


# --- the pool -------------------------------------------------------------------------------------------------

class _Job:
    def __init__(self, fn, tasks):
        self.fn, self.tasks = fn, tasks
        self.next = itertools.count()            # next(): atomic under the GIL, so each task is taken once
        self.left = len(tasks)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error, self.cancelled, self.active = None, False, 0
        self.context = contextvars.copy_context()  # the caller's settings (numpy's errstate) for the workers too

    def work(self, worker=False):
        while True:
            i = next(self.next)
            if i >= len(self.tasks):
                return
            if worker:
                with self.lock:
                    self.active += 1
            try:
                if not self.cancelled:
                    with _in_task():
                        if worker:
                            self.context.copy().run(self.fn, self.tasks[i])
                        else:
                            self.fn(self.tasks[i])
            except BaseException as e:           # re-raised by the caller's thread
                self.error = self.error or e
            finally:
                with self.lock:
                    self.left -= 1
                    self.active -= worker
                    if self.left == 0:
                        self.done.set()

    def cancel(self):
        """The caller was interrupted: start no more tasks, and wait for the workers' tasks under way."""
        self.cancelled = True
        while True:
            with self.lock:
                if self.active == 0:
                    return
            time.sleep(0.001)


_task = threading.local()                    # .depth > 0 while this thread runs a pool task


class _in_task:
    def __enter__(self):
        _task.depth = getattr(_task, "depth", 0) + 1

    def __exit__(self, *exc):
        _task.depth -= 1


def inline():
    """True where pool.run would run its tasks one after another on the calling thread: one thread, or a caller
    that is itself a pool task (a piece of a batch cut over the threads, batch_threads.py)."""
    return pool.n_threads == 1 or getattr(_task, "depth", 0) > 0


class ChunkPool:
    """`run(fn, tasks)` calls fn(task) for every task on n_threads threads (the caller's and n_threads - 1
    daemon workers), handing tasks out dynamically, and returns when all are done (also when interrupted:
    no worker writes into the caller's arrays after run returns or raises). Called from inside one of its own
    tasks, it runs the tasks inline: the threads are busy with the outer job already."""

    def __init__(self, n_threads):
        self.n_threads = n_threads
        self._reset()
        if hasattr(os, "register_at_fork"):      # a forked child has none of the parent's threads
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self):
        self._job, self._cond, self._workers = None, threading.Condition(), []

    def _worker(self):
        seen = None
        while True:
            with self._cond:
                while self._job is seen or self._job is None:
                    self._cond.wait()
                seen = job = self._job
            job.work(worker=True)

    def run(self, fn, tasks):
        if self.n_threads == 1 or len(tasks) == 1 or getattr(_task, "depth", 0) > 0:
            for task in tasks:
                fn(task)
            return
        if not self._workers:
            self._workers = [threading.Thread(target=self._worker, daemon=True, name=f"tinypalm-{i}")
                             for i in range(self.n_threads - 1)]
            for t in self._workers:
                t.start()
        job = _Job(fn, tasks)
        with self._cond:
            self._job = job
            self._cond.notify_all()
        try:
            job.work()
            job.done.wait()
        except BaseException:
            job.cancel()
            raise
        if job.error is not None:
            raise job.error


def default_threads():
    env = os.environ.get("TINYPALM_NUM_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise TinyPalmError(f"TINYPALM_NUM_THREADS={env!r}: give a positive whole number of threads")
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows
        return os.cpu_count() or 1


pool = ChunkPool(default_threads())


def row_chunks(n_rows, row_bytes, scale=1):
    """Slices cutting n_rows into pieces of about scale * ELEMENTWISE_CHUNK_BYTES (at least one row each)."""
    rows = max(1, scale * ELEMENTWISE_CHUNK_BYTES // max(1, row_bytes))
    return [slice(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


def gemm_chunks(n, flops_per_unit):
    """Slices cutting the n rows (or columns) of a matmul's output into pieces of GEMM_CHUNK_FLOPS work or more:
    2 per thread and at least GEMM_MIN_CHUNKS (beyond that, the repeated packing of the shared operand costs
    more than a finer balance gains), and more for a large matmul, so that no piece exceeds GEMM_MAX_CHUNK_FLOPS
    (a thread that loses its core mid-piece holds the others up for the rest of that piece). The cut depends on
    the thread count only above GEMM_MIN_CHUNKS / 2 threads. Run inline, a matmul is one piece: one GEMM call
    packs the shared operand once."""
    if inline():
        return [slice(0, n)]
    total = n * flops_per_unit
    most = max(GEMM_MIN_CHUNKS, 2 * pool.n_threads, math.ceil(total / GEMM_MAX_CHUNK_FLOPS))
    pieces = max(1, min(most, int(total // GEMM_CHUNK_FLOPS), n))
    bounds = [round(i * n / pieces) for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def ours(*arrays):
    """True when every array is a numpy float32 or float64 array of one dtype (else: use the ops.py function)."""
    dtype = arrays[0].dtype
    return all(isinstance(a, np.ndarray) and a.dtype == dtype for a in arrays) and dtype in HANDLED


# --- LayerNorm without bias ---------------------------------------------------------------------------------
# numpy's mean over a short last axis (D = 128) walks the rows one at a time and costs several passes' worth; a
# matrix-vector product with a (D,) vector of 1/D (one BLAS gemv) gives the same row means at the cost of one
# pass, and np.vecdot the row sums of squares. An element-wise op against a (D,) or (N, 1) operand costs about
# two plain passes (numpy's inner loop is one row): the forward has three (x - mean, * rstd, * gain), the
# backward four, and the backward's statistics come from gemvs against gain / D without forming dxhat first.

def _row_dots(a, b):
    # a, b (n, D) -> (n,) row-wise dot products; np.vecdot (numpy >= 2) is one pass, einsum the fallback
    return np.vecdot(a, b) if hasattr(np, "vecdot") else np.einsum("ij,ij->i", a, b)


def layernorm_forward(x, gain, eps):
    # x (N, D), gain (D,) -> y (N, D), cache (xhat, rstd (N, 1)) as in ops.py
    if not ours(x, gain) or x.ndim != 2:
        return ops.layernorm_forward(x, gain, eps)
    N, D = x.shape
    y, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty((N, 1), x.dtype)
    mean_weights = np.full(D, 1.0 / D, x.dtype)                   # x @ mean_weights = the row means (N,)

    def chunk(r):
        xc = np.subtract(x[r], (x[r] @ mean_weights)[:, None], out=xhat[r])     # x - mean
        var = _row_dots(xc, xc)                                                 # (n,) sums of squares
        var *= 1.0 / D
        var += eps
        np.power(var, -0.5, out=rstd[r, 0])
        xc *= rstd[r]                                                           # xhat
        np.multiply(xc, gain, out=y[r])
    pool.run(chunk, row_chunks(N, D * x.itemsize))
    return y, (xhat, rstd)


def layernorm_backward(dy, gain, d_gain, cache):
    # dxhat = dy * gain; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means over D.
    # Both means are gemvs against gain / D: mean(dxhat) = dy @ (gain / D), and mean(dxhat * xhat) =
    # (dy * xhat) @ (gain / D), where dy * xhat is also what d_gain sums over the rows
    xhat, rstd = cache
    if not ours(dy, gain, d_gain, xhat, rstd) or dy.ndim != 2:
        return ops.layernorm_backward(dy, gain, d_gain, cache)
    N, D = dy.shape
    dx, scratch = np.empty_like(dy), np.empty_like(dy)
    chunks = row_chunks(N, D * dy.itemsize)
    partial = np.empty((len(chunks), D), dy.dtype)          # d_gain per chunk, added in chunk order
    gain_mean = gain / D                                    # (D,)

    def chunk(i):
        r = chunks[i]
        dy_xhat = np.multiply(dy[r], xhat[r], out=scratch[r])                  # (n, D)
        np.matmul(np.ones(len(dy_xhat), dy.dtype), dy_xhat, out=partial[i])    # column sums: one gemv
        mean_dxhat_xhat = (dy_xhat @ gain_mean)[:, None]                        # (n, 1)
        mean_dxhat = (dy[r] @ gain_mean)[:, None]                               # (n, 1)
        dxr = np.multiply(dy[r], gain, out=dx[r])                               # dxhat
        dxr -= mean_dxhat
        dxr -= np.multiply(xhat[r], mean_dxhat_xhat, out=dy_xhat)
        dxr *= rstd[r]
    pool.run(chunk, range(len(chunks)))
    d_gain += partial.sum(axis=0)
    return dx


# --- linear (no bias) ---------------------------------------------------------------------------------------

def linear_forward(x, w):
    # x (N, in), w (in, out) -> y (N, out): row chunks of x, each one single-threaded GEMM
    if not ours(x, w) or x.ndim != 2:
        return ops.linear_forward(x, w)
    N, n_in = x.shape
    y = np.empty((N, w.shape[1]), x.dtype)

    def chunk(r):
        np.matmul(x[r], w, out=y[r])
    pool.run(chunk, gemm_chunks(N, 2 * n_in * w.shape[1]))
    return y


def _weight_grad_tasks(dw, x, dy, scale=None):
    """Tasks adding scale * x^T dy into dw (in, out), cut along dw's longer side; x (N, in), dy (N, out)."""
    n_in, n_out = dw.shape
    N = x.shape[0]

    def rows(r):                                 # dw[r] += x[:, r]^T dy
        t = x[:, r].T @ dy
        if scale is not None:
            t *= scale
        dw[r] += t

    def cols(c):                                 # dw[:, c] += x^T dy[:, c]
        t = x.T @ dy[:, c]
        if scale is not None:
            t *= scale
        dw[:, c] += t
    if n_in >= n_out:
        return [(rows, r) for r in gemm_chunks(n_in, 2 * N * n_out)]
    return [(cols, c) for c in gemm_chunks(n_out, 2 * N * n_in)]


def _run_tasks(tasks):
    pool.run(lambda task: task[0](task[1]), tasks)


def linear_backward(dy, x, w, dw):
    # dw (in, out) accumulates x^T dy; returns dx = dy w^T. Both GEMMs' chunks go to the pool as one job.
    if not ours(dy, x, w, dw) or dy.ndim != 2:
        return ops.linear_backward(dy, x, w, dw)
    N, n_out = dy.shape
    dx = np.empty((N, w.shape[0]), dy.dtype)

    def dx_rows(r):
        np.matmul(dy[r], w.T, out=dx[r])
    tasks = _weight_grad_tasks(dw, x, dy) + [(dx_rows, r) for r in gemm_chunks(N, 2 * n_out * w.shape[0])]
    _run_tasks(tasks)
    return dx


# --- tied output projection ---------------------------------------------------------------------------------

def tied_logits_forward(h, embed):
    # h (N, D), embed (V, D) -> logits (N, V) = h @ embed^T / sqrt(D)
    if not ours(h, embed) or h.ndim != 2:
        return ops.tied_logits_forward(h, embed)
    N, D = h.shape
    logits = np.empty((N, embed.shape[0]), h.dtype)
    scale = 1.0 / math.sqrt(D)

    def chunk(r):
        np.matmul(h[r], embed.T, out=logits[r])
        logits[r] *= scale
    pool.run(chunk, gemm_chunks(N, 2 * D * embed.shape[0]))
    return logits


def tied_logits_backward(dlogits, h, embed, d_embed):
    # d_embed (V, D) accumulates dlogits^T h / sqrt(D); returns dh = dlogits embed / sqrt(D)
    if not ours(dlogits, h, embed, d_embed) or h.ndim != 2:
        return ops.tied_logits_backward(dlogits, h, embed, d_embed)
    N, V = dlogits.shape
    scale = 1.0 / math.sqrt(embed.shape[1])
    dh = np.empty_like(h)

    def dh_rows(r):
        np.matmul(dlogits[r], embed, out=dh[r])
        dh[r] *= scale
    _run_tasks(_weight_grad_tasks(d_embed, dlogits, h, scale)
               + [(dh_rows, r) for r in gemm_chunks(N, 2 * V * embed.shape[1])])
    return dh


# --- embedding ------------------------------------------------------------------------------------------------

def embedding_backward(xp, d_embed, dx, tokens):
    # d_embed (V, D) += the rows of dx summed per token (a token repeated in the batch gets the sum). np.add.at
    # on the flattened d_embed with one index per element takes numpy's fast 1-D path (numpy >= 1.25), several
    # times faster than add.at by rows or a sort and np.add.reduceat; it adds in the same order as ops.py's
    if not ours(d_embed, dx) or not d_embed.flags.c_contiguous:
        return ops.embedding_backward(xp, d_embed, dx, tokens)
    D = d_embed.shape[1]
    flat_tokens = np.asarray(tokens).reshape(-1).astype(np.intp, copy=False)
    index = (flat_tokens[:, None] * D + np.arange(D)).reshape(-1)          # (N * D,) into d_embed.reshape(-1)
    np.add.at(d_embed.reshape(-1), index, dx.reshape(-1))


# --- rotary position embedding ------------------------------------------------------------------------------
# out = x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[Dh/2:], x[:Dh/2]). With the sign folded into
# a signed sin table, the rotated half is one product over a view of x with its two halves swapped (x as
# (.., 2, Dh/2) read backwards along the 2), so the op is three passes: x * cos, swapped x * signed sin, and
# their sum, instead of five over half rows. The tables are repeated over the nh heads (T * nh * Dh: 1/B of x):
# against a (T, 1, Dh) table numpy's inner loop is one head's Dh, against a (T, nh, Dh) one a whole row.

def _rope(x, cos, sin, forward):
    # x (B, T, nh, Dh), cos/sin (T, 1, Dh) -> out (B, T, nh, Dh); chunks over B
    B, T, nh, Dh = x.shape
    h = Dh // 2
    cos_rows = np.broadcast_to(cos, (T, nh, Dh)).astype(x.dtype) if nh > 1 else cos          # (T, nh, Dh)
    signed_sin = np.empty((T, nh, 2, h), x.dtype)           # multiplies the swapped halves
    lo, hi = sin[:, :, None, :h], sin[:, :, None, h:]       # (T, 1, 1, h)
    if forward:           # out_lo = x_lo cos_lo - x_hi sin_lo, out_hi = x_hi cos_hi + x_lo sin_hi
        np.negative(lo, out=signed_sin[:, :, :1])
        signed_sin[:, :, 1:] = hi
    else:                 # the transpose: dx_lo = d_lo cos_lo + d_hi sin_hi, dx_hi = d_hi cos_hi - d_lo sin_lo
        signed_sin[:, :, :1] = hi
        np.negative(lo, out=signed_sin[:, :, 1:])
    out = np.empty(x.shape, x.dtype)

    def chunk(b):
        xb = x[b]
        n = xb.shape[0]
        if nh > 1 and not xb.flags.c_contiguous:
            # q: a column block of the projection, strided rows: read once (see SwiGLU). Not k: its rows (one
            # head) are too short for the copy to pay
            xb = out[b]
            np.copyto(xb, x[b])
        swapped = xb.reshape(n, T, nh, 2, h)[:, :, :, ::-1]                    # (n, T, nh, 2, h) view
        rotated = np.multiply(swapped, signed_sin, out=np.empty((n, T, nh, 2, h), x.dtype))
        o = np.multiply(xb, cos_rows, out=out[b])
        o += rotated.reshape(n, T, nh, Dh)
    pool.run(chunk, row_chunks(B, x[0].nbytes))
    return out


def _rope_shapes(x, cos, sin):
    # what _rope handles: x (B, T, nh, Dh) with Dh even, tables (T, 1, Dh)
    return x.ndim == 4 and x.shape[-1] % 2 == 0 and cos.shape == sin.shape == (x.shape[1], 1, x.shape[3])


def rope_forward(x, cos, sin):
    # x (B, T, nh, Dh), cos/sin (T, 1, Dh)
    if not ours(x, cos, sin) or not _rope_shapes(x, cos, sin):
        return ops.rope_forward(x, cos, sin)
    return _rope(x, cos, sin, forward=True)


def rope_backward(dout, cos, sin):
    if not ours(dout, cos, sin) or not _rope_shapes(dout, cos, sin):
        return ops.rope_backward(dout, cos, sin)
    return _rope(dout, cos, sin, forward=False)


# --- causal attention with shared key/value heads -----------------------------------------------------------

def attention_forward(xp, q, k, v, mask):
    # q (B, T, H, Dh), k/v (B, S, Hkv, Dh), mask (G*T, S) -> out (B, T, H, Dh); cache as in ops.py.
    # One chunk = a few batch rows: their scores, softmax and output, all while the scores sit in the cache.
    if not ours(q, k, v, mask):
        return ops.attention_forward(xp, q, k, v, mask)
    B, T, H, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(Dh)
    qg = np.empty((B, Hkv, G * T, Dh), q.dtype)
    probs = np.empty((B, Hkv, G * T, S), q.dtype)
    out = np.empty((B, T, H, Dh), q.dtype)
    kt = k.transpose(0, 2, 3, 1)                                   # (B, Hkv, Dh, S)
    vt = v.transpose(0, 2, 1, 3)                                   # (B, Hkv, S, Dh)

    def chunk(b):
        n = len(range(B)[b])
        qg[b].reshape(n, Hkv, G, T, Dh)[...] = (q[b] * scale).reshape(n, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4)
        scores = np.matmul(qg[b], kt[b], out=probs[b])             # (n, Hkv, G*T, S)
        scores += mask
        ops.softmax_forward(np, scores)
        o = scores @ vt[b]                                         # (n, Hkv, G*T, Dh)
        out[b].reshape(n, T, Hkv, G, Dh)[...] = o.reshape(n, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4)
    pool.run(chunk, row_chunks(B, Hkv * G * T * S * q.itemsize, 2))
    return out, (qg, kt, vt, probs, scale)


def attention_backward(dout, cache):
    # returns dq (B, T, H, Dh), dk, dv (B, S, Hkv, Dh), contiguous; chunks over the batch as in the forward
    qg, kt, vt, probs, scale = cache
    if not ours(dout, qg, kt, vt, probs):
        return ops.attention_backward(dout, cache)
    B, Hkv, GT, Dh = qg.shape
    T, S = dout.shape[1], kt.shape[-1]
    G = GT // T
    dq = np.empty((B, T, Hkv * G, Dh), dout.dtype)
    dk, dv = np.empty((B, S, Hkv, Dh), dout.dtype), np.empty((B, S, Hkv, Dh), dout.dtype)

    def chunk(b):
        n = len(range(B)[b])
        dout_g = np.ascontiguousarray(dout[b].reshape(n, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4)).reshape(n, Hkv, GT, Dh)
        dprobs = dout_g @ vt[b].swapaxes(-1, -2)                   # (n, Hkv, G*T, S)
        dv[b] = (probs[b].swapaxes(-1, -2) @ dout_g).transpose(0, 2, 1, 3)      # summed over the G heads
        dscores = ops.softmax_backward(dprobs, probs[b])
        dqg = dscores @ kt[b].swapaxes(-1, -2)                     # (n, Hkv, G*T, Dh)
        dqg *= scale
        dk[b] = (qg[b].swapaxes(-1, -2) @ dscores).transpose(0, 3, 1, 2)
        dq[b].reshape(n, T, Hkv, G, Dh)[...] = dqg.reshape(n, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4)
    pool.run(chunk, row_chunks(B, Hkv * GT * S * dout.itemsize, 2))
    return dq, dk, dv


# --- SwiGLU ---------------------------------------------------------------------------------------------------
# Bound by the exp (numpy's float32 exp costs ~10 plain passes) and by memory: gate and up are column blocks of
# the projection, and a pass reading their strided rows costs 2-4 times one over a contiguous array. So one pass
# per result, and the forward reads gate once (ops.py: twice). Measured and not kept: chunks small enough to
# stay in L2 across the passes (the per-call overhead of more, smaller chunks cost more than the cache saved),
# and leaving silu out of the cache for the backward to recompute (no faster over forward + backward).

def swiglu_forward(xp, gate, up):
    # gate, up (N, F) -> hidden (N, F), cache (gate, up, sig, silu) as in ops.py. With s = 1 + exp(-a):
    # sig = 1 / s, silu = a / s, both from -a (the one read of gate) and -s. numpy's exp is faster than its tanh,
    # and exp(-a) = inf (a < -88 in float32) gives sig = 0 and silu = -0 exactly
    if not ours(gate, up) or gate.ndim != 2:
        return ops.swiglu_forward(xp, gate, up)
    N, F = gate.shape
    sig, silu, hidden = np.empty((N, F), gate.dtype), np.empty((N, F), gate.dtype), np.empty((N, F), gate.dtype)

    def chunk(r):
        minus_a = np.negative(gate[r], out=silu[r])
        minus_s = sig[r]
        with np.errstate(over="ignore"):
            np.exp(minus_a, out=minus_s)
        np.subtract(-1.0, minus_s, out=minus_s)                    # -s = -(1 + exp(-a))
        np.divide(minus_a, minus_s, out=silu[r])                   # a / s
        np.divide(-1.0, minus_s, out=sig[r])                       # 1 / s
        np.multiply(silu[r], up[r], out=hidden[r])
    pool.run(chunk, row_chunks(N, F * gate.itemsize))
    return hidden, (gate, up, sig, silu)


def swiglu_backward(dhidden, cache):
    # d_up = dh * silu; d_gate = dh * up * silu'(a), silu'(a) = sig (1 + a (1 - sig)) = sig (1 + a - silu).
    # dh (strided, a column block of the output projection's gradient) is read once, into d_up: one more pass
    # than reading it twice, but a contiguous one
    gate, up, sig, silu = cache
    if not ours(dhidden, gate, up, sig, silu) or dhidden.ndim != 2:
        return ops.swiglu_backward(dhidden, cache)
    N, F = dhidden.shape
    d_gate, d_up = np.empty((N, F), dhidden.dtype), np.empty((N, F), dhidden.dtype)

    def chunk(r):
        dh = d_up[r]
        np.copyto(dh, dhidden[r])
        g = np.subtract(gate[r], silu[r], out=d_gate[r])
        g += 1.0
        g *= sig[r]
        g *= dh
        g *= up[r]
        dh *= silu[r]                                               # d_up
    pool.run(chunk, row_chunks(N, F * dhidden.itemsize))
    return d_gate, d_up


# --- the loss ---------------------------------------------------------------------------------------------------

def cross_entropy_forward(xp, logits, targets, z_loss):
    # logits (N, V), targets (N,) -> loss, cache (probs, log_z, targets) as in ops.py.
    # One shift M for the whole batch instead of each row's maximum (ops.py): one fast reduction instead of a
    # per-row max and a broadcast subtraction, and the row sums are a gemv. M = 0 while the largest logit is
    # within +-64 (exp(logits) itself then neither overflows nor loses a row: no subtraction pass at all), else
    # that largest logit. No exp overflows (sums stay below V e^64); a row whose logits all lie far below M
    # could underflow, so when some row's sum is below 2^-64 the whole batch is redone by ops.py, per row
    if not ours(logits) or logits.ndim != 2 or logits.size == 0:
        return ops.cross_entropy_forward(xp, logits, targets, z_loss)
    N, V = logits.shape
    largest = logits.max()
    if not np.isfinite(largest) or V > 2 ** 20:
        return ops.cross_entropy_forward(xp, logits, targets, z_loss)
    shift = largest if abs(largest) > 64 else 0.0
    probs, log_z = np.empty_like(logits), np.empty((N, 1), logits.dtype)
    ones = np.ones(V, logits.dtype)
    chunks = row_chunks(N, V * logits.itemsize)
    underflow = np.zeros(len(chunks), bool)

    def chunk(i):
        r = chunks[i]
        p = np.subtract(logits[r], shift, out=probs[r]) if shift else logits[r]
        p = np.exp(p, out=probs[r])
        total = p @ ones                                                        # (n,) row sums
        if total.min() < 2.0 ** -64:
            underflow[i] = True
            return
        p *= (1.0 / total)[:, None]
        np.log(total, out=log_z[r, 0])
        log_z[r] += shift
    pool.run(chunk, range(len(chunks)))
    if underflow.any():
        return ops.cross_entropy_forward(xp, logits, targets, z_loss)
    nll = log_z[:, 0] - logits[np.arange(N), targets]
    loss = nll.mean() + z_loss * (log_z * log_z).mean()
    return loss, (probs, log_z, targets)


def cross_entropy_backward(xp, cache, z_loss):
    probs, log_z, targets = cache
    if not ours(probs, log_z) or probs.ndim != 2:
        return ops.cross_entropy_backward(xp, cache, z_loss)
    N, V = probs.shape
    dlogits = np.empty_like(probs)
    row_scale = (1.0 + 2.0 * z_loss * log_z) / N                   # (N, 1)

    def chunk(r):
        np.multiply(probs[r], row_scale[r], out=dlogits[r])
    pool.run(chunk, row_chunks(N, V * probs.itemsize))
    dlogits[np.arange(N), targets] -= 1.0 / N
    return dlogits


TWINS = ("layernorm_forward", "layernorm_backward", "linear_forward", "linear_backward", "tied_logits_forward",
         "tied_logits_backward", "embedding_backward", "rope_forward", "rope_backward", "attention_forward",
         "attention_backward", "swiglu_forward", "swiglu_backward", "cross_entropy_forward", "cross_entropy_backward")


def twins():
    """name -> twin, for backend.op_overrides('numpy')."""
    return {name: globals()[name] for name in TWINS}
