"""cpu_ops.py's block-causal attention against ops.py's full computation.

The fixture shrinks everything so that these small shapes exercise every part: blocks of 4 positions (T not a
multiple of it, so a short last block), the block path for any number of query rows, one batch row per chunk,
and 3 threads (the machine may have fewer cores: the threads then just take turns)."""

import warnings

import numpy as np
import pytest

from gradcheck import assert_grad_close
from test_cpu_ops import assert_same, plain_model, randn
from tinypalm import Config, PaLM, cpu_ops, ops


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(3))
    monkeypatch.setattr(cpu_ops, "ELEMENTWISE_CHUNK_BYTES", 512)
    monkeypatch.setattr(cpu_ops, "ATTENTION_BLOCK", 4)
    monkeypatch.setattr(cpu_ops, "ATTENTION_MIN_ROWS", 1)


DTYPES = [np.float64, np.float32]
HEADS = [(4, 1), (4, 2), (3, 3), (6, 2)]                                  # (H, Hkv)
POSITIONS = [(13, 13, 0),     # training: T = S, first_pos 0, 13 positions = 3 blocks of 4 and one of 1
             (8, 8, 0),       # T a multiple of the block
             (5, 12, 7),      # a cached continuation: first_pos = S - T
             (1, 9, 8),       # one new token
             (7, 10, 1),      # first_pos < S - T: the last keys are masked for every row
             (4, 6, 5)]       # first_pos > S - T: every row sees every key


def inputs(rng, B, T, S, H, Hkv, Dh, dtype):
    # q, k, v as the model passes them: q contiguous (the rotary output), k and v strided views of one array
    q = randn(rng, (B, T, H, Dh), dtype)
    kv = randn(rng, (B, S, 2 * Hkv, Dh), dtype)
    return q, kv[:, :, :Hkv], kv[:, :, Hkv:]


def record_max_subtracted(monkeypatch):
    """A list that gets, for every block the twin computes, whether it subtracted the row maximum."""
    seen, block_probs = [], cpu_ops._block_probs

    def recording(*args):
        seen.append(args[-1])
        return block_probs(*args)
    monkeypatch.setattr(cpu_ops, "_block_probs", recording)
    return seen


def both(q, k, v, mask, dout):
    """(out, dq, dk, dv, cache) from the twin and from ops.py."""
    out, cache = cpu_ops.attention_forward(np, q, k, v, mask)
    out_ref, cache_ref = ops.attention_forward(np, q, k, v, mask)
    return ((out, *cpu_ops.attention_backward(dout, cache), cache),
            (out_ref, *ops.attention_backward(dout, cache_ref), cache_ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_causal_attention_matches_ops(dtype, heads, positions):
    (H, Hkv), (T, S, first) = heads, positions
    rng = np.random.default_rng(H * 100 + Hkv * 10 + T)
    q, k, v = inputs(rng, 3, T, S, H, Hkv, 8, dtype)
    mask = ops.causal_mask(np, T, S, first, H // Hkv, dtype)
    dout = randn(rng, (3, T, H, 8), dtype)
    (*got, cache), (*want, _) = both(q, k, v, mask, dout)
    assert isinstance(cache, cpu_ops.CausalAttentionCache)              # the block path, not the fallback
    assert_same(tuple(got), tuple(want), dtype)
    assert_same(cpu_ops.attention_backward(dout, cache), tuple(got[1:]), dtype)    # the cache is not used up


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_layout_strided_dout(dtype, monkeypatch):
    # dout as the model passes it: a strided view of the gradient of [attention out | SwiGLU out]
    rng = np.random.default_rng(0)
    B, T, H, Dh = 2, 11, 4, 8
    q, k, v = inputs(rng, B, T, T, H, 1, Dh, dtype)
    d_branches = randn(rng, (B * T, H * Dh + 5), dtype)
    dout = d_branches[:, :H * Dh].reshape(B, T, H, Dh)
    max_subtracted = record_max_subtracted(monkeypatch)
    got, want = both(q, k, v, ops.causal_mask(np, T, T, 0, H, dtype), dout)
    assert isinstance(got[-1], cpu_ops.CausalAttentionCache)
    assert len(max_subtracted) == 3 * B and not any(max_subtracted)    # 3 blocks per chunk, exp(scores) directly
    assert_same(got[:4], want[:4], dtype)


def test_gradients_against_finite_differences():
    rng = np.random.default_rng(1)
    B, T, S, H, Hkv, Dh = 2, 6, 7, 4, 2, 3
    q, k, v = inputs(rng, B, T, S, H, Hkv, Dh, np.float64)
    k, v = k.copy(), v.copy()                                          # perturbed element by element
    mask = ops.causal_mask(np, T, S, S - T, H // Hkv, np.float64)
    dout = rng.standard_normal((B, T, H, Dh))
    out, cache = cpu_ops.attention_forward(np, q, k, v, mask)
    assert isinstance(cache, cpu_ops.CausalAttentionCache)
    dq, dk, dv = cpu_ops.attention_backward(dout, cache)
    loss = lambda: (cpu_ops.attention_forward(np, q, k, v, mask)[0] * dout).sum()
    for grad, x in ((dq, q), (dk, k), (dv, v)):
        assert_grad_close(grad, loss, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [40.0, -40.0])
def test_scores_out_of_exp_range_are_done_with_the_maximum(dtype, size, monkeypatch):
    # exp(scores) without the row maximum would overflow (scores in the hundreds) or leave every term of a row
    # zero (all scores of a row far below zero): those blocks are done again with the maximum subtracted,
    # quietly (warnings are errors here)
    rng = np.random.default_rng(2)
    B, T, H, Dh = 2, 9, 4, 8
    q, k, v = inputs(rng, B, T, T, H, 1, Dh, dtype)
    k[:] = np.abs(k) + 1                                               # every key positive
    q = np.abs(q) * np.asarray(size, dtype)                            # scores all large, or all very negative
    mask = ops.causal_mask(np, T, T, 0, H, dtype)
    dout = randn(rng, (B, T, H, Dh), dtype)
    max_subtracted = record_max_subtracted(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = both(q, k, v, mask, dout)
    assert isinstance(got[-1], cpu_ops.CausalAttentionCache)
    assert max_subtracted.count(True) == 3 * B                         # every block done again
    assert np.isfinite(got[0]).all()
    # scores of size ~150 carry float32 rounding of ~150 * 6e-8 (the twin scales k where ops.py scales q), and
    # the probabilities that much relative error
    tol = 1e-12 if dtype == np.float64 else 1e-4
    for g, w in zip(got[:4], want[:4]):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


def not_causal_masks(T, S, G, dtype):
    causal = ops.causal_mask(np, T, S, S - T, G, dtype)
    one_seen = causal.copy()
    one_seen[T + 1, -1] = 0                                            # head 1's row 1 sees a future key
    one_hidden = causal.copy()
    one_hidden[2, 0] = -np.inf                                         # head 0's row 2 does not see key 0
    biased = causal.copy()
    biased[:, 0] += 0.5                                                # a finite bias on the visible keys
    heads_differ = np.concatenate([ops.causal_mask(np, T, S, S - T, 1, dtype),
                                   ops.causal_mask(np, T, S, S - T - 1, G - 1, dtype)])
    finite = np.where(np.isinf(causal), -1e9, 0).astype(dtype)         # -1e9 instead of -inf: close, not equal
    random = np.random.default_rng(3).standard_normal((G * T, S)).astype(dtype)
    broadcast = np.zeros((1, S), dtype)                                # one row for all: ops.py broadcasts it
    return [one_seen, one_hidden, biased, heads_differ, finite, random, broadcast]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", range(7))
def test_other_masks_get_the_full_computation(dtype, which):
    rng = np.random.default_rng(which)
    B, T, S, H, Hkv, Dh = 2, 5, 8, 4, 2, 6
    q, k, v = inputs(rng, B, T, S, H, Hkv, Dh, dtype)
    mask = not_causal_masks(T, S, H // Hkv, dtype)[which]
    dout = randn(rng, (B, T, H, Dh), dtype)
    got, want = both(q, k, v, mask, dout)
    assert not isinstance(got[-1], cpu_ops.CausalAttentionCache)
    assert_same(got[:4], want[:4], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_takes_the_plain_cache(dtype):
    # tests and tinypalm.bench may pair ops.py's forward with the twin's backward
    rng = np.random.default_rng(4)
    q, k, v = inputs(rng, 2, 7, 7, 4, 1, 8, dtype)
    out, cache = ops.attention_forward(np, q, k, v, ops.causal_mask(np, 7, 7, 0, 4, dtype))
    dout = randn(rng, out.shape, dtype)
    assert_same(cpu_ops.attention_backward(dout, cache), ops.attention_backward(dout, cache), dtype)


def test_dout_of_another_dtype_gives_gradients_of_that_dtype():
    rng = np.random.default_rng(5)
    q, k, v = inputs(rng, 2, 7, 7, 4, 1, 8, np.float32)
    mask = ops.causal_mask(np, 7, 7, 0, 4, np.float32)
    _, cache = cpu_ops.attention_forward(np, q, k, v, mask)
    _, cache_ref = ops.attention_forward(np, q, k, v, mask)
    dout = rng.standard_normal((2, 7, 4, 8))                           # float64
    got, want = cpu_ops.attention_backward(dout, cache), ops.attention_backward(dout, cache_ref)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_unhandled_dtypes_and_few_rows_go_to_ops(monkeypatch):
    # float16 stands for every dtype the twin leaves to ops.py (bfloat16 among them); and with the default
    # ATTENTION_MIN_ROWS, generating one token (T*G rows < 64) is ops.py's computation, its cache and all
    rng = np.random.default_rng(6)
    q, k, v = inputs(rng, 2, 9, 9, 4, 1, 8, np.float16)
    mask = ops.causal_mask(np, 9, 9, 0, 4, np.float16)
    out, cache = cpu_ops.attention_forward(np, q, k, v, mask)
    np.testing.assert_array_equal(out, ops.attention_forward(np, q, k, v, mask)[0])
    assert out.dtype == np.float16 and isinstance(cache, tuple)
    monkeypatch.setattr(cpu_ops, "ATTENTION_MIN_ROWS", 64)
    q, k, v = inputs(rng, 2, 1, 30, 8, 1, 8, np.float32)
    mask = ops.causal_mask(np, 1, 30, 29, 8, np.float32)
    out, cache = cpu_ops.attention_forward(np, q, k, v, mask)
    assert isinstance(cache, tuple)
    np.testing.assert_array_equal(out, ops.attention_forward(np, q, k, v, mask)[0])
    q, k, v = inputs(rng, 2, 8, 30, 8, 1, 8, np.float32)                # 64 rows: the block path
    assert isinstance(cpu_ops.attention_forward(np, q, k, v, ops.causal_mask(np, 8, 30, 22, 8, np.float32))[1],
                      cpu_ops.CausalAttentionCache)


def test_chunks_and_threads_change_nothing(monkeypatch):
    # every batch row is computed the same way whatever the chunk it falls in: bit for bit the same
    rng = np.random.default_rng(7)
    B, T, H, Dh = 5, 10, 6, 8
    q, k, v = inputs(rng, B, T, T, H, 2, Dh, np.float32)
    mask = ops.causal_mask(np, T, T, 0, 3, np.float32)
    dout = randn(rng, (B, T, H, Dh), np.float32)
    results = []
    for threads, chunk_bytes in ((3, 512), (1, 1 << 20)):             # 5 chunks on 3 threads; one chunk
        monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(threads))
        monkeypatch.setattr(cpu_ops, "ELEMENTWISE_CHUNK_BYTES", chunk_bytes)
        out, cache = cpu_ops.attention_forward(np, q, k, v, mask)
        assert len(cache.chunks) == (5 if threads == 3 else 1)
        results.append((out, *cpu_ops.attention_backward(dout, cache)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)])
def test_whole_model_with_block_attention(dtype, heads):
    H, Hkv = heads
    cfg = Config(vocab_size=37, d_model=16, n_layers=2, n_heads=H, n_kv_heads=Hkv, max_seq_len=24)
    fast = PaLM(cfg, dtype=dtype.__name__, seed=1)
    assert fast.ops.attention_forward is cpu_ops.attention_forward
    plain = plain_model(PaLM(cfg, dtype=dtype.__name__, seed=1))
    rng = np.random.default_rng(H + Hkv)
    tokens, targets = rng.integers(0, 37, (3, 11)), rng.integers(0, 37, (3, 11))
    loss, grads = fast.loss_and_grads(tokens, targets)
    loss_ref, grads_ref = plain.loss_and_grads(tokens, targets)
    assert_same(loss, loss_ref, dtype)
    assert_same(grads.flat, grads_ref.flat, dtype)
    cache, cache_ref = fast.new_kv_cache(3), plain.new_kv_cache(3)     # generation: continuing cached positions
    for chunk in (tokens[:, :6], tokens[:, 6:7], tokens[:, 7:10]):
        assert_same(fast.forward(chunk, cache), plain.forward(chunk, cache_ref), dtype)
