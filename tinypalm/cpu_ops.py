"""Faster twins of ops.py functions for the numpy backend: the same math, cut into chunks that run on all cores.

Why. numpy runs element-wise work on one core, and its BLAS (OpenBLAS) splits each matmul over all cores
with threads that spin at a barrier until every one of them is done. On an idle machine that is fine; when
another program holds a core, every small matmul waits for the descheduled thread (the attention's batched
matmuls made training 20x slower). Here BLAS runs single-threaded, and a small pool of persistent threads
(`ChunkPool`) takes an operation cut into row chunks and hands the chunks out one at a time: a thread that
loses its core just takes fewer chunks. numpy and BLAS release the GIL while they compute, so the threads
really run in parallel. A chunk stays in the cache while an element-wise op makes its several passes over it,
so they cost one trip to memory. The pool has one thread per core the process may use; TINYPALM_NUM_THREADS=n
sets it (1: everything on the calling thread), and it is 1 where numpy's BLAS cannot be set to one thread
(backend.py: that BLAS keeps the cores). Training goes one level up (batch_threads.py): each thread runs a
piece of the batch through the whole model, and the twins it calls run their chunks inline on that thread.

Each function has exactly the signature and the cache format of its ops.py twin (so a twin's backward also
accepts the plain forward's cache) and is tested against it (tests/test_cpu_ops.py). Attention is the exception:
its twin skips the masked scores outside the diagonal blocks of causal attention (at T = 64 it computes 75% of
the scores, toward 50% as T grows), and its cache is its own (its backward takes ops.py's
cache too; tests/test_cpu_attention.py). Inputs these twins do not handle (any dtype other than float32 and
float64, e.g. bfloat16) go to the ops.py function unchanged.
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
GEMM_CHUNK_FLOPS = 16_000_000             # at least this many FLOPs (half as many multiply-adds) a chunk (~0.3 ms)
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
        self.context = contextvars.copy_context()  # the caller's settings (numpy's errstate) for the workers too,
        self.errstate = np.geterr()                # which numpy before 2.0 keeps per thread instead

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
                            with np.errstate(**self.errstate):
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

    @property
    def workers(self):
        """The pool's own threads, started at its first shared run (its tasks also run on the caller's thread)."""
        return tuple(self._workers)

    def _worker(self):
        seen = None
        while True:
            with self._cond:
                while self._job is seen or self._job is None:
                    self._cond.wait()
                seen = job = self._job
            job.work(worker=True)

    def run(self, fn, tasks):
        if self.n_threads == 1 or len(tasks) <= 1 or getattr(_task, "depth", 0) > 0:     # nothing to share
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


def default_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows
        return os.cpu_count() or 1


def default_threads():
    env = os.environ.get("TINYPALM_NUM_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise TinyPalmError(f"TINYPALM_NUM_THREADS={env!r}: give a positive whole number of threads")
        return int(env)
    return default_cores()


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


def _given(grad):
    # a gradient argument as the arrays ours() checks: none when it is None (a frozen parameter)
    return () if grad is None else (grad,)


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
    # a, b (..., D) -> (...) dot products along the last axis; np.vecdot (numpy >= 2) is one pass, einsum the fallback
    return np.vecdot(a, b) if hasattr(np, "vecdot") else np.einsum("...i,...i->...", a, b)


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
    if not ours(dy, gain, xhat, rstd, *_given(d_gain)) or dy.ndim != 2:
        return ops.layernorm_backward(dy, gain, d_gain, cache)
    N, D = dy.shape
    dx, scratch = np.empty_like(dy), np.empty_like(dy)
    chunks = row_chunks(N, D * dy.itemsize)
    partial = np.empty((len(chunks), D), dy.dtype)          # d_gain per chunk, added in chunk order
    gain_mean = gain / D                                    # (D,)

    def chunk(i):
        r = chunks[i]
        dy_xhat = np.multiply(dy[r], xhat[r], out=scratch[r])                  # (n, D)
        if d_gain is not None:
            np.matmul(np.ones(len(dy_xhat), dy.dtype), dy_xhat, out=partial[i])    # column sums: one gemv
        mean_dxhat_xhat = (dy_xhat @ gain_mean)[:, None]                        # (n, 1)
        mean_dxhat = (dy[r] @ gain_mean)[:, None]                               # (n, 1)
        dxr = np.multiply(dy[r], gain, out=dx[r])                               # dxhat
        dxr -= mean_dxhat
        dxr -= np.multiply(xhat[r], mean_dxhat_xhat, out=dy_xhat)
        dxr *= rstd[r]
    pool.run(chunk, range(len(chunks)))
    if d_gain is not None:
        d_gain += partial.sum(axis=0)
    return dx


# --- linear (no bias) ---------------------------------------------------------------------------------------

def _product_tasks(out, a, b, scale=None):
    """Tasks writing out = scale * a @ b (a (N, k), b (k, m), out (N, m)), one per row chunk of a: each chunk is
    one single-threaded GEMM, scaled while it is still in the cache."""
    def rows(r):
        np.matmul(a[r], b, out=out[r])
        if scale is not None:
            out[r] *= scale
    return [(rows, r) for r in gemm_chunks(len(a), 2 * a.shape[1] * b.shape[1])]


def _weight_grad_tasks(dw, x, dy, scale=None):
    """Tasks adding scale * x^T dy into dw (in, out), cut along dw's longer side; x (N, in), dy (N, out)."""
    n_in, n_out = dw.shape
    N = x.shape[0]

    def part(cut):                               # dw[r, c] += x[:, r]^T dy[:, c], one of r and c all of it
        r, c = cut
        t = x[:, r].T @ dy[:, c]
        if scale is not None:
            t *= scale
        dw[r, c] += t
    every = slice(None)
    if n_in >= n_out:
        return [(part, (r, every)) for r in gemm_chunks(n_in, 2 * N * n_out)]
    return [(part, (every, c)) for c in gemm_chunks(n_out, 2 * N * n_in)]


def _run_tasks(tasks):
    pool.run(lambda task: task[0](task[1]), tasks)


def linear_forward(x, w):
    # x (N, in), w (in, out) -> y (N, out): row chunks of x, each one single-threaded GEMM
    if not ours(x, w) or x.ndim != 2:
        return ops.linear_forward(x, w)
    y = np.empty((len(x), w.shape[1]), x.dtype)
    _run_tasks(_product_tasks(y, x, w))
    return y


def linear_backward(dy, x, w, dw):
    # dw (in, out) accumulates x^T dy (None: frozen); returns dx = dy w^T. Both GEMMs' chunks go to the pool as
    # one job.
    if not ours(dy, x, w, *_given(dw)) or dy.ndim != 2:
        return ops.linear_backward(dy, x, w, dw)
    dx = np.empty((len(dy), w.shape[0]), dy.dtype)
    _run_tasks((_weight_grad_tasks(dw, x, dy) if dw is not None else []) + _product_tasks(dx, dy, w.T))
    return dx


# --- tied output projection ---------------------------------------------------------------------------------

def tied_logits_forward(h, embed):
    # h (N, D), embed (V, D) -> logits (N, V) = h @ embed^T / sqrt(D)
    if not ours(h, embed) or h.ndim != 2:
        return ops.tied_logits_forward(h, embed)
    logits = np.empty((len(h), embed.shape[0]), h.dtype)
    _run_tasks(_product_tasks(logits, h, embed.T, 1.0 / math.sqrt(h.shape[1])))
    return logits


def tied_logits_backward(dlogits, h, embed, d_embed):
    # d_embed (V, D) accumulates dlogits^T h / sqrt(D) (None: frozen); returns dh = dlogits embed / sqrt(D)
    if not ours(dlogits, h, embed, *_given(d_embed)) or h.ndim != 2:
        return ops.tied_logits_backward(dlogits, h, embed, d_embed)
    scale = 1.0 / math.sqrt(embed.shape[1])
    dh = np.empty_like(h)
    _run_tasks((_weight_grad_tasks(d_embed, dlogits, h, scale) if d_embed is not None else [])
               + _product_tasks(dh, dlogits, embed, scale))
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

_rope_tables = {}                         # (shapes, dtypes, nh, forward) -> (cos, sin bytes, cos_rows, signed_sin)


def _rope_rows(cos, sin, nh, dtype, forward):
    """cos repeated over the nh heads (T, nh, Dh), and the signed sin that multiplies the swapped halves
    (T, nh, 2, Dh/2). Kept from call to call (the model passes the same tables every time, and building them
    costs as much as a quarter of the op): a kept pair is used only when the tables passed have the same bytes."""
    T, _, Dh = cos.shape
    key = (cos.shape, cos.dtype, sin.shape, sin.dtype, nh, dtype, forward)
    cos_bytes, sin_bytes = cos.tobytes(), sin.tobytes()
    kept = _rope_tables.get(key)            # (a local: another thread may clear the dict meanwhile)
    if kept is not None and kept[0] == cos_bytes and kept[1] == sin_bytes:
        return kept[2], kept[3]
    h = Dh // 2
    cos_rows = np.broadcast_to(cos, (T, nh, Dh)).astype(dtype)
    signed_sin = np.empty((T, nh, 2, h), dtype)
    lo, hi = sin[:, :, None, :h], sin[:, :, None, h:]       # (T, 1, 1, h)
    if forward:           # out_lo = x_lo cos_lo - x_hi sin_lo, out_hi = x_hi cos_hi + x_lo sin_hi
        np.negative(lo, out=signed_sin[:, :, :1])
        signed_sin[:, :, 1:] = hi
    else:                 # the transpose: dx_lo = d_lo cos_lo + d_hi sin_hi, dx_hi = d_hi cos_hi - d_lo sin_lo
        signed_sin[:, :, :1] = hi
        np.negative(lo, out=signed_sin[:, :, 1:])
    if len(_rope_tables) > 64:
        _rope_tables.clear()
    _rope_tables[key] = (cos_bytes, sin_bytes, cos_rows, signed_sin)
    return cos_rows, signed_sin


def _rope(x, cos, sin, forward):
    # x (B, T, nh, Dh), cos/sin (T, 1, Dh) -> out (B, T, nh, Dh); chunks over B
    B, T, nh, Dh = x.shape
    h = Dh // 2
    cos_rows, signed_sin = _rope_rows(cos, sin, nh, x.dtype, forward)
    out = np.empty(x.shape, x.dtype)

    def chunk(b):
        xb = x[b]
        n = xb.shape[0]
        if nh > 1 and not xb.flags.c_contiguous:
            # q (and k with several kv heads): a column block of the projection, strided rows: read once (see
            # SwiGLU). Not a single head's: its rows are too short for the copy to pay
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
#
# ops.py computes all T x S scores and lets the causal mask zero half of them. Here the query positions are cut
# into blocks of ATTENTION_BLOCK: the block of positions [a, e) sees keys [0, first + e) only (first = first_pos,
# the position of query 0), and of those only the last few, [first + a, first + e), need the mask (the diagonal).
#
# Rows. Key/value head j serves the G query heads j*G .. j*G + G-1. Its query rows are ordered position-major:
# row t*G + g is head j*G + g at position t, so a block of positions is a block of rows, and with one key/value
# head q (B, T, H, Dh) already is these rows, (B, T*G, Dh), and so is out: no transposing copies either way.
#
# Key-major probabilities. A block's scores are computed transposed, (keys L, rows R) = k q^T: the diagonal keys
# [first + a, first + e) are then one contiguous slab that the mask is added to, and the per-row softmax sums and
# scales run along whole contiguous rows of R numbers (numpy is slow on many short rows).
#
# Softmax without the row maximum. exp(scores) is computed directly, and the row sums checked: while every one is
# within EXP_RANGE nothing overflowed and the largest terms are normal numbers, so p = exp(s) / sum exp(s) is as
# accurate as with the maximum subtracted, without the max and subtract passes. A block outside it is computed
# again the usual way.
#
# 1/sqrt(Dh) is folded into whichever of q (T*G rows) and k (S rows) has fewer rows: k in training, q when a
# chunk of at least ATTENTION_MIN_ROWS query rows meets a longer cache. The scaled one is a copy the cache keeps;
# the other stays a view.
#
# Backward, per block: dp = dout v^T, dscores = p (dp - c) with c = rowsum(p dp) = rowsum(dout out), then
# dv = p^T dout, dk = dscores^T q, dq = dscores k (each times 1/sqrt(Dh) where it was not folded in);
# dk and dv add up over the blocks.
#
# Any other mask (checked: one comparison over the mask) goes to ops.py's full computation, and so do few query
# rows (generating a token: T*G < ATTENTION_MIN_ROWS, where ops.py's few larger calls are faster and there is no
# masked half to skip); attention_backward takes ops.py's cache as well as its own.
# The cache keeps the probabilities of the blocks only (75% of ops.py's (G*T, S) at T = 64, toward half as T
# grows).

ATTENTION_BLOCK = 32                      # query positions per block: smaller skips more masked scores, larger
                                          # makes fewer, larger products
ATTENTION_MIN_ROWS = 64                   # fewer query rows (T*G: generating a token or a few) go to ops.py
EXP_RANGE = 2.0 ** 60                     # row sums of exp(scores) in [1 / EXP_RANGE, EXP_RANGE]: no overflow,
                                          # no subnormals among the terms that count
_triangles = {}                           # (m, G, dtype) -> the mask of m positions against the same m keys


def _triangle(m, G, dtype):
    """The causal mask of m query positions against the same m keys: zeros on and below the diagonal, -inf above.
    key-major and with each position's G rows: (m keys, m*G rows), column t*G + g."""
    key = (m, G, dtype)
    triangle = _triangles.get(key)          # (a local: another thread may clear the dict meanwhile)
    if triangle is None:
        upper = ops.causal_mask(np, m, m, 0, 1, dtype)              # (m, m): position t sees keys 0 .. t
        triangle = np.ascontiguousarray(np.repeat(upper.T, G, axis=1))
        if len(_triangles) > 64:
            _triangles.clear()
        _triangles[key] = triangle
    return triangle


def _causal_first_pos(mask, T, S, G):
    """first_pos if mask is exactly ops.causal_mask(np, T, S, first_pos, G, mask.dtype) (row g*T + t: zeros for
    keys 0 .. first_pos + t, -inf after), else None."""
    if mask.shape != (G * T, S):
        return None
    heads = mask.reshape(G, T, S)
    if S >= T:                              # the model's first_pos = S - T: zeros, then the triangle of T keys
        first = S - T
        seen, diagonal = heads[:, :, :first], heads[:, :, first:]
        if not seen.any() and (diagonal == _triangle(T, 1, mask.dtype).T).all():
            return first
    first = int(np.count_nonzero(mask[0] == 0)) - 1               # any other first_pos: row 0 sees keys 0 .. first
    if first < 0 or not (heads == ops.causal_mask(np, T, S, first, 1, mask.dtype)).all():
        return None
    return first


class CausalAttentionCache:
    """What attention_backward needs from attention_forward's causal path (the full path's cache is ops.py's)."""

    def __init__(self, shape, scale, scale_on_q, chunks, blocks, out_rows, pieces):
        self.shape = shape                # (B, T, S, Hkv, G, Dh)
        self.scale = scale                # 1 / sqrt(Dh), folded into q if scale_on_q, else into k
        self.scale_on_q = scale_on_q
        self.chunks = chunks              # slices of the batch rows, one pool task each
        self.blocks = blocks              # [(a, e, lo, L, tile)] as attention_forward makes them
        self.out_rows = out_rows          # (B, Hkv, T*G, Dh): the output, position-major (for Hkv == 1 the
                                          # returned out itself: the caller leaves it as it is, as it leaves q, k, v)
        self.pieces = pieces              # [chunk * Hkv + j] -> (q_rows, k_rows, v_rows, [probs^T (n, L, R) per block])


def _block_probs(q_blk, k_rows, lo, L, tile, subtract_max):
    # q_blk (n, R, Dh), k_rows (n, S, Dh) -> probs^T (n, L, R) and the row sums of exp (n, 1, R), before dividing
    pt = np.matmul(k_rows[:, :L], q_blk.swapaxes(-1, -2))         # (n, L, R) scores^T
    if tile is not None:
        pt[:, lo:] += tile                                         # the diagonal keys: a contiguous slab
    if subtract_max:
        pt -= pt.max(axis=1, keepdims=True)
    np.exp(pt, out=pt)
    return pt, np.add.reduce(pt, axis=1, keepdims=True)


def attention_forward(xp, q, k, v, mask):
    # q (B, T, H, Dh), k/v (B, S, Hkv, Dh), mask (G*T, S) -> out (B, T, H, Dh), cache (a CausalAttentionCache when
    # mask is causal, else ops.py's). One chunk = a few batch rows, all their blocks.
    if not ours(q, k, v, mask) or mask.ndim != 2 or 0 in q.shape[:2] or k.shape[1] == 0:
        return ops.attention_forward(xp, q, k, v, mask)
    B, T, H, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    if T * G < ATTENTION_MIN_ROWS:          # few rows, no masked half worth skipping: ops.py's few larger calls
        return ops.attention_forward(xp, q, k, v, mask)
    first = _causal_first_pos(mask, T, S, G)
    if first is None:                                              # not a causal mask: every score, as ops.py
        return ops.attention_forward(xp, q, k, v, mask)
    # block [a, e) sees keys [0, L); those before lo are unmasked, and keys [lo, L) take the triangle's first rows
    blocks = []
    for a in range(0, T, ATTENTION_BLOCK):
        e = min(a + ATTENTION_BLOCK, T)
        L = min(S, first + e)
        lo = min(first + a, L)
        blocks.append((a, e, lo, L, _triangle(e - a, G, q.dtype)[:L - lo] if L - lo > 1 else None))
    scale = 1.0 / math.sqrt(Dh)
    scale_on_q = T * G < S
    q5 = q.reshape(B, T, Hkv, G, Dh)
    out_rows = np.empty((B, Hkv, T * G, Dh), q.dtype)              # position-major rows per key/value head
    chunks = row_chunks(B, Hkv * G * T * S * q.itemsize, 2)
    pieces = [None] * (len(chunks) * Hkv)

    def chunk(i):
        with np.errstate(over="ignore", divide="ignore"):          # exp(scores) may overflow or underflow to 0:
            chunk_rows(i)                                          # then that block is done again

    def chunk_rows(i):
        b = chunks[i]
        n = b.stop - b.start
        for j in range(Hkv):
            q_rows = q5[b, :, j].reshape(n, T * G, Dh)             # a view when q is contiguous and Hkv == 1
            k_rows, v_rows = k[b, :, j], v[b, :, j]                # (n, S, Dh) views
            if scale_on_q:
                q_rows = q_rows * scale
            else:
                k_rows = k_rows * scale
            probs = []
            for a, e, lo, L, tile in blocks:
                rows = slice(a * G, e * G)
                pt, total = _block_probs(q_rows[:, rows], k_rows, lo, L, tile, False)
                r = 1.0 / total
                if not np.maximum.reduce(np.maximum(total, r), axis=None) <= EXP_RANGE:     # NaN fails too
                    pt, total = _block_probs(q_rows[:, rows], k_rows, lo, L, tile, True)
                    r = 1.0 / total
                pt *= r
                np.matmul(pt.swapaxes(-1, -2), v_rows[:, :L], out=out_rows[b, j, rows])   # (n, R, Dh)
                probs.append(pt)
            pieces[i * Hkv + j] = (q_rows, k_rows, v_rows, probs)
    pool.run(chunk, range(len(chunks)))
    # (B, Hkv, T, G, Dh) -> (B, T, Hkv, G, Dh): free for Hkv == 1 (a size-1 axis moves)
    out = np.ascontiguousarray(out_rows.reshape(B, Hkv, T, G, Dh).transpose(0, 2, 1, 3, 4)).reshape(B, T, H, Dh)
    return out, CausalAttentionCache((B, T, S, Hkv, G, Dh), scale, scale_on_q, chunks, blocks, out_rows, pieces)


def attention_backward(dout, cache):
    # dout (B, T, H, Dh) -> dq (B, T, H, Dh), dk, dv (B, S, Hkv, Dh), contiguous; chunks as in the forward
    if not isinstance(cache, CausalAttentionCache):                # ops.py's cache: its backward
        return ops.attention_backward(dout, cache)
    B, T, S, Hkv, G, Dh = cache.shape
    dtype = cache.out_rows.dtype
    if not ours(dout) or dout.dtype != dtype:                      # e.g. float64 dout for a float32 forward
        return tuple(g.astype(dout.dtype) for g in attention_backward(np.asarray(dout, dtype), cache))
    scale, scale_on_q, chunks = cache.scale, cache.scale_on_q, cache.chunks
    dout5 = dout.reshape(B, T, Hkv, G, Dh)
    dq_rows = np.empty((B, Hkv, T * G, Dh), dtype)
    dk_rows, dv_rows = np.zeros((B, Hkv, S, Dh), dtype), np.zeros((B, Hkv, S, Dh), dtype)

    def chunk(i):
        b = chunks[i]
        n = b.stop - b.start
        for j in range(Hkv):
            q_rows, k_rows, v_rows, probs = cache.pieces[i * Hkv + j]
            dk, dv = dk_rows[b, j], dv_rows[b, j]                  # (n, S, Dh)
            for (a, e, lo, L, tile), pt in zip(cache.blocks, probs):
                rows = slice(a * G, e * G)
                dout_blk = dout5[b, a:e, j].reshape(n, -1, Dh)     # (n, R, Dh): a copy where dout is a strided
                                                                   # view (the model's is)
                c = _row_dots(dout_blk, cache.out_rows[b, j, rows])[:, None, :]                   # (n, 1, R)
                dst = np.matmul(v_rows[:, :L], dout_blk.swapaxes(-1, -2))                       # (n, L, R) dp^T
                dst -= c
                dst *= pt                                          # dscores^T
                dv[:, :L] += np.matmul(pt, dout_blk)
                dk[:, :L] += np.matmul(dst, q_rows[:, rows])
                dq = np.matmul(dst.swapaxes(-1, -2), k_rows[:, :L], out=dq_rows[b, j, rows])    # (n, R, Dh)
                if scale_on_q:
                    dq *= scale
            if not scale_on_q:
                dk *= scale
    pool.run(chunk, range(len(chunks)))
    dq = np.ascontiguousarray(dq_rows.reshape(B, Hkv, T, G, Dh).transpose(0, 2, 1, 3, 4)).reshape(B, T, Hkv * G, Dh)
    return dq, np.ascontiguousarray(dk_rows.transpose(0, 2, 1, 3)), np.ascontiguousarray(dv_rows.transpose(0, 2, 1, 3))


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
    # dh (strided, a column block of the gradient at the output projection's input) is read once, into d_up: one
    # more pass than reading it twice, but a contiguous one
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
