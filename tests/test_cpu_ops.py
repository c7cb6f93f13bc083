"""cpu_ops.py's chunked twins against their ops.py functions, op by op and through the whole model.

The chunk sizes are shrunk and the pool given 3 threads, so that even these small shapes are cut into many
chunks run concurrently (the machine may have fewer cores: the threads then just take turns)."""

import threading
import time
import types
import warnings

import numpy as np
import pytest

from tinypalm import Config, PaLM, TinyPalmError, cpu_ops, ops
from tinypalm.flat import flatten
from tinypalm.optim import AdamW

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-6, atol=2e-6)}


@pytest.fixture(autouse=True)
def many_small_chunks(monkeypatch):
    monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(3))
    monkeypatch.setattr(cpu_ops, "ELEMENTWISE_CHUNK_BYTES", 512)
    monkeypatch.setattr(cpu_ops, "GEMM_CHUNK_FLOPS", 2000)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def assert_same(a, b, dtype):
    # the result and its dtype: a twin must not change the precision
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, dtype)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


DTYPES = [np.float64, np.float32]
ROWS = [1, 7, 50]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", ROWS)
@pytest.mark.parametrize("D", [24, 128])
def test_layernorm(dtype, N, D):
    rng = np.random.default_rng(N)
    x, gain, dy = randn(rng, (N, D), dtype) * 3 + 1, randn(rng, D, dtype), randn(rng, (N, D), dtype)
    y, cache = cpu_ops.layernorm_forward(x, gain, 1e-5)
    y_ref, cache_ref = ops.layernorm_forward(x, gain, 1e-5)
    assert_same(y, y_ref, dtype)
    assert_same(cache, cache_ref, dtype)
    d_gain, d_gain_ref = np.full(D, 0.5, dtype), np.full(D, 0.5, dtype)
    dx_ref = ops.layernorm_backward(dy, gain, d_gain_ref, cache_ref)
    assert_same(cpu_ops.layernorm_backward(dy, gain, d_gain, cache), dx_ref, dtype)
    assert_same(d_gain, d_gain_ref, dtype)
    assert_same(cpu_ops.layernorm_backward(dy, gain, d_gain, cache_ref), dx_ref, dtype)     # ops.py's cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5, 3), (40, 17, 9), (33, 8, 70)])
def test_linear(dtype, shape):
    N, n_in, n_out = shape
    rng = np.random.default_rng(N)
    x, w, dy = randn(rng, (N, n_in), dtype), randn(rng, (n_in, n_out), dtype), randn(rng, (N, n_out), dtype)
    assert_same(cpu_ops.linear_forward(x, w), ops.linear_forward(x, w), dtype)
    wide = randn(rng, (n_in, n_out + 6), dtype)
    w_view, dw_view = wide[:, 3:-3], np.zeros_like(wide)[:, 3:-3]      # strided, as the model's weight views
    assert_same(cpu_ops.linear_forward(x, w_view), ops.linear_forward(x, w_view), dtype)
    dw, dw_ref = np.ones_like(w), np.ones_like(w)                      # accumulates onto what is there
    assert_same(cpu_ops.linear_backward(dy, x, w, dw), ops.linear_backward(dy, x, w, dw_ref), dtype)
    assert_same(dw, dw_ref, dtype)
    dx = cpu_ops.linear_backward(dy, x, w_view, dw_view)
    assert_same(dx, ops.linear_backward(dy, x, w_view, np.zeros_like(w_view)), dtype)
    assert_same(dw_view, x.T @ dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", ROWS)
def test_tied_logits_and_cross_entropy(dtype, N):
    rng = np.random.default_rng(N)
    V, D = 19, 12
    h, embed = randn(rng, (N, D), dtype), randn(rng, (V, D), dtype)
    targets = rng.integers(0, V, N)
    logits = cpu_ops.tied_logits_forward(h, embed)
    assert_same(logits, ops.tied_logits_forward(h, embed), dtype)
    loss, cache = cpu_ops.cross_entropy_forward(np, logits * 4, targets, 1e-2)
    loss_ref, cache_ref = ops.cross_entropy_forward(np, logits * 4, targets, 1e-2)
    assert_same(loss, loss_ref, dtype)
    assert_same(cache[:2], cache_ref[:2], dtype)
    dlogits = cpu_ops.cross_entropy_backward(np, cache, 1e-2)
    assert_same(dlogits, ops.cross_entropy_backward(np, cache_ref, 1e-2), dtype)
    assert_same(cpu_ops.cross_entropy_backward(np, cache_ref, 1e-2), dlogits, dtype)       # ops.py's cache
    d_embed, d_embed_ref = np.ones_like(embed), np.ones_like(embed)
    assert_same(cpu_ops.tied_logits_backward(dlogits, h, embed, d_embed),
                ops.tied_logits_backward(dlogits, h, embed, d_embed_ref), dtype)
    assert_same(d_embed, d_embed_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("low", [-10.0, -200.0, -1e5])
@pytest.mark.parametrize("high", [0.0, 100.0])
def test_cross_entropy_rows_far_below_the_batch_max(dtype, low, high, monkeypatch):
    # the twin shifts every row alike (by 0, or by the batch's largest logit beyond +-64: high = 100): rows far
    # below the others must still match ops.py (per-row shifts), whether their exp underflows (-200, -1e5: the
    # batch is redone by ops.py) or just gets small (-10: the twin's own result)
    rng = np.random.default_rng(1)
    logits = randn(rng, (9, 13), dtype) * 3 + dtype(high)
    logits[[2, 5]] += low
    targets = rng.integers(0, 13, 9)
    redone = []
    plain = ops.cross_entropy_forward
    monkeypatch.setattr(ops, "cross_entropy_forward", lambda *args: redone.append(1) or plain(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no 1/0 on the way to the fallback
        loss, cache = cpu_ops.cross_entropy_forward(np, logits, targets, 1e-4)
    assert len(redone) == (low < -100)
    loss_ref, cache_ref = ops.cross_entropy_forward(np, logits, targets, 1e-4)
    assert np.isfinite(loss)
    assert_same(loss, loss_ref, dtype)
    assert_same(cache[:2], cache_ref[:2], dtype)
    assert_same(cpu_ops.cross_entropy_backward(np, cache, 1e-4), ops.cross_entropy_backward(np, cache_ref, 1e-4), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_sums_repeated_tokens(dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, (4, 9))                                # 36 tokens over 6 ids: many repeats
    tokens[0, :4] = 5
    dx = randn(rng, (4, 9, 8), dtype)
    d_embed, d_embed_ref = randn(rng, (10, 8), dtype), None
    d_embed_ref = d_embed.copy()
    cpu_ops.embedding_backward(np, d_embed, dx, tokens)
    ops.embedding_backward(np, d_embed_ref, dx, tokens)
    assert_same(d_embed, d_embed_ref, dtype)
    cpu_ops.embedding_backward(np, d_embed, dx[:, :5], tokens[:, :5].astype(np.int32))   # strided dx, int32 ids
    ops.embedding_backward(np, d_embed_ref, dx[:, :5], tokens[:, :5])
    assert_same(d_embed, d_embed_ref, dtype)
    wide, wide_ref = np.zeros((10, 12), dtype), np.zeros((10, 12), dtype)
    cpu_ops.embedding_backward(np, wide[:, 2:10], dx, tokens)                          # a strided gradient view
    ops.embedding_backward(np, wide_ref[:, 2:10], dx, tokens)
    assert_same(wide, wide_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 1, 4), (5, 7, 3, 8), (9, 4, 2, 6), (3, 6, 4, 32), (2, 5, 1, 32)])
def test_rope(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    B, T, nh, Dh = shape
    cos, sin = ops.rope_tables(np, 16, Dh, 10000.0, dtype)
    cos, sin = cos[2:2 + T, None], sin[2:2 + T, None]                  # not starting at position 0
    wide = randn(rng, (B, T, nh + 2, Dh), dtype)
    x = wide[:, :, 1:-1]                                               # a strided view, as q and k are
    assert_same(cpu_ops.rope_forward(x, cos, sin), ops.rope_forward(x, cos, sin), dtype)
    assert_same(cpu_ops.rope_backward(x, cos, sin), ops.rope_backward(x, cos, sin), dtype)
    dout = randn(rng, (B, T, nh, Dh), dtype)                             # contiguous, as attention's dq, dk
    assert_same(cpu_ops.rope_backward(dout, cos, sin), ops.rope_backward(dout, cos, sin), dtype)


def test_rope_kept_tables_follow_the_tables_passed():
    # the twin keeps its repeated tables from call to call; tables of the same shape but other positions, or
    # changed in place, must not get the kept ones
    rng = np.random.default_rng(7)
    cos, sin = ops.rope_tables(np, 24, 8, 10000.0, np.float64)
    x = randn(rng, (2, 6, 3, 8), np.float64)
    for first in (0, 5, 0, 11):                                        # same shape, other positions, and back
        c, s = cos[first:first + 6, None], sin[first:first + 6, None]
        assert_same(cpu_ops.rope_forward(x, c, s), ops.rope_forward(x, c, s), np.float64)
        assert_same(cpu_ops.rope_backward(x, c, s), ops.rope_backward(x, c, s), np.float64)
    c, s = cos[:6, None].copy(), sin[:6, None].copy()
    cpu_ops.rope_forward(x, c, s)
    c[2] *= -1.0
    s[3] += 0.5
    assert_same(cpu_ops.rope_forward(x, c, s), ops.rope_forward(x, c, s), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("positions", [(6, 6, 0), (3, 8, 5)])            # training; a cached continuation
def test_attention(dtype, heads, positions):
    H, Hkv = heads
    T, S, first = positions
    B, Dh = 5, 6
    rng = np.random.default_rng(H * 10 + Hkv + T)
    q = randn(rng, (B, T, H, Dh), dtype)
    kv = randn(rng, (B, S, 2 * Hkv, Dh), dtype)
    k, v = kv[:, :, :Hkv], kv[:, :, Hkv:]                             # strided views, as in the model
    mask = ops.causal_mask(np, T, S, first, H // Hkv, dtype)
    out, cache = cpu_ops.attention_forward(np, q, k, v, mask)
    out_ref, cache_ref = ops.attention_forward(np, q, k, v, mask)
    assert_same(out, out_ref, dtype)
    dout = randn(rng, out.shape, dtype)
    assert_same(cpu_ops.attention_backward(dout, cache), ops.attention_backward(dout, cache_ref), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", ROWS)
def test_swiglu(dtype, N):
    rng = np.random.default_rng(N)
    proj = randn(rng, (N, 30), dtype) * 4                              # large gates: the tails of the sigmoid
    proj[0, :3] = [-1000.0, 1000.0, 0.0]                               # exp overflows: sig must be exactly 0
    gate, up = proj[:, :15], proj[:, 15:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # and quietly
        hidden, cache = cpu_ops.swiglu_forward(np, gate, up)
    assert cache[2][0, 0] == 0 and cache[2][0, 1] == 1
    hidden_ref, cache_ref = ops.swiglu_forward(np, gate, up)
    assert_same(hidden, hidden_ref, dtype)
    dh = randn(rng, (N, 15), dtype)
    grads_ref = ops.swiglu_backward(dh, cache_ref)
    assert_same(cpu_ops.swiglu_backward(dh, cache), grads_ref, dtype)
    assert_same(cpu_ops.swiglu_backward(dh, cache_ref), grads_ref, dtype)                 # ops.py's cache
    assert_same(ops.swiglu_backward(dh, cache), grads_ref, dtype)                         # and the reverse


def test_unhandled_dtypes_go_to_ops():
    # float16 stands for every dtype the twins leave to ops.py (bfloat16 among them): same result, same dtype
    rng = np.random.default_rng(0)
    x, w = randn(rng, (6, 4), np.float16), randn(rng, (4, 3), np.float16)
    np.testing.assert_array_equal(cpu_ops.linear_forward(x, w), ops.linear_forward(x, w))
    gate, up = randn(rng, (6, 4), np.float16), randn(rng, (6, 4), np.float16)
    hidden, cache = cpu_ops.swiglu_forward(np, gate, up)
    np.testing.assert_array_equal(hidden, ops.swiglu_forward(np, gate, up)[0])
    assert hidden.dtype == np.float16
    np.testing.assert_array_equal(cpu_ops.swiglu_backward(hidden, cache)[0], ops.swiglu_backward(hidden, cache)[0])


SHAPES = [dict(n_heads=4, n_kv_heads=1), dict(n_heads=4, n_kv_heads=2), dict(n_heads=2, n_kv_heads=2, d_ff=37)]


def plain_model(model):
    """The same model calling only ops.py's functions."""
    plain = {name: getattr(ops, name) for name in dir(ops) if not name.startswith("_") and callable(getattr(ops, name))}
    model.ops = types.SimpleNamespace(**plain)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_whole_model_loss_and_gradients(dtype, shape):
    cfg = Config(vocab_size=37, d_model=16, n_layers=2, max_seq_len=24, **SHAPES[shape])
    fast = PaLM(cfg, dtype=dtype.__name__, seed=1)
    assert fast.ops.linear_forward is cpu_ops.linear_forward           # the numpy backend uses the twins
    plain = plain_model(PaLM(cfg, dtype=dtype.__name__, seed=1))
    rng = np.random.default_rng(shape)
    tokens, targets = rng.integers(0, 37, (6, 11)), rng.integers(0, 37, (6, 11))
    loss, grads = fast.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=3)
    loss_ref, grads_ref = plain.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=3)
    assert_same(loss, loss_ref, dtype)
    assert_same(grads.flat, grads_ref.flat, dtype)
    assert_same(fast.forward(tokens[:, :4]), plain.forward(tokens[:, :4]), dtype)
    cache, cache_ref = fast.new_kv_cache(6), plain.new_kv_cache(6)     # generation: continuing cached positions
    for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:9]):
        assert_same(fast.forward(chunk, cache), plain.forward(chunk, cache_ref), dtype)


def test_op_results_are_reproducible_for_any_number_of_threads(monkeypatch):
    # the ops alone (the batch not cut into pieces, see test_batch_threads.py): tasks never share an output and
    # partial sums are added in chunk order, so which thread runs which chunk changes nothing, bit for bit; the
    # number of threads changes the cut of a matmul, which may change its rounding only
    cfg = Config(vocab_size=37, d_model=16, n_layers=2, n_heads=4, max_seq_len=24)
    tokens = np.random.default_rng(0).integers(0, 37, (6, 11))
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(threads))
        model = PaLM(cfg, dtype="float32", seed=1)
        model.split_batch = None
        runs = [model.loss_and_grads(tokens, tokens) for _ in range(3)]
        for loss, grads in runs[1:]:
            assert loss == runs[0][0]
            np.testing.assert_array_equal(grads.flat, runs[0][1].flat)
        results.append(runs[0])
    for loss, grads in results[1:]:
        assert_same(loss, results[0][0], np.float32)
        assert_same(grads.flat, results[0][1].flat, np.float32)


def test_pool_runs_every_task_once_and_reraises():
    pool = cpu_ops.ChunkPool(4)
    seen = []
    pool.run(seen.append, list(range(100)))
    assert sorted(seen) == list(range(100))

    def fail(task):
        if task == 7:
            raise ValueError("task 7")
    with pytest.raises(ValueError, match="task 7"):
        pool.run(fail, list(range(20)))
    pool.run(seen.append, [100])                                       # still usable afterwards
    assert seen[-1] == 100
    empty = threading.Thread(target=pool.run, args=(seen.append, []), daemon=True)   # no tasks: returns at once
    empty.start()
    empty.join(timeout=10)
    assert not empty.is_alive() and len(seen) == 101


def test_cancelled_job_waits_for_tasks_under_way():
    # what ChunkPool.run does when Ctrl-C reaches the caller: no task starts afterwards, and none is still
    # running when it returns
    started, running, ran = threading.Event(), [], []

    def slow(task):
        running.append(task)
        started.set()
        time.sleep(0.02)
        ran.append(task)
        running.remove(task)
    job = cpu_ops._Job(slow, list(range(50)))
    worker = threading.Thread(target=job.work, args=(True,))
    worker.start()
    started.wait()
    job.cancel()
    assert running == [] and len(ran) == 1
    worker.join()
    assert len(ran) == 1 and job.left == 0                             # the skipped tasks were all counted


def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("TINYPALM_NUM_THREADS", "3")
    assert cpu_ops.default_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("TINYPALM_NUM_THREADS", bad)
        with pytest.raises(TinyPalmError, match="TINYPALM_NUM_THREADS"):
            cpu_ops.default_threads()


def test_adamw_in_pieces_matches_the_formula():
    # on numpy AdamW.step cuts the flat vector into pieces run by the pool: check a vector of many pieces
    rng = np.random.default_rng(0)
    params = flatten(np, {"embed": rng.standard_normal((40, 3)), "layers.0.wq": rng.standard_normal((30, 7)),
                          "norm": rng.standard_normal(11)})
    decayed = np.zeros(params.flat.size, bool)
    decayed[slice(*params.layout.spans["layers.0.wq"])] = True
    p, m, v = params.flat.copy(), np.zeros_like(params.flat), np.zeros_like(params.flat)
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t, lr in enumerate((1e-2, 3e-2), start=1):
        g = rng.standard_normal(p.size)
        opt.step(params, params.layout.wrap(g.copy()), lr)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        p = np.where(decayed, p * (1 - lr * 0.1), p)
        p = p - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-8)
    np.testing.assert_allclose(params.flat, p, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.v.flat, v, rtol=1e-12)


def test_bench_vs_torch_without_torch_is_one_error_line():
    # PyTorch is never a dependency: without it, --vs-torch says how to get it, in one line
    import subprocess
    import sys
    from test_cli import assert_user_error
    code = ("import sys; sys.modules['torch'] = None; from tinypalm import bench; from tinypalm.cli import run_cli; "
            "run_cli(lambda: bench.main(['--vs-torch', '--steps', '1', '--warmup', '0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_user_error(result, "--vs-torch", "pip install torch==2.13.0")
