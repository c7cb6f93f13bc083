"""Each op's backward against central finite differences in float64, via loss = sum(out * dout)."""

import numpy as np
import pytest

from tinypalm import ops
from gradcheck import assert_grad_close

rng = np.random.default_rng(1234)


def randn(*shape):
    return rng.standard_normal(shape)


def test_layernorm():
    x, gain, dy = randn(6, 10) * 3 + 1, randn(10), randn(6, 10)
    loss = lambda: (ops.layernorm_forward(x, gain, 1e-5)[0] * dy).sum()
    _, cache = ops.layernorm_forward(x, gain, 1e-5)
    d_gain = np.zeros(10)
    dx = ops.layernorm_backward(dy, gain, d_gain, cache)
    assert_grad_close(dx, loss, x)
    assert_grad_close(d_gain, loss, gain)


def test_layernorm_normalises():
    y, _ = ops.layernorm_forward(randn(5, 32) * 7 - 3, np.ones(32), 1e-5)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-5)


def test_linear():
    x, w, dy = randn(7, 5), randn(5, 3), randn(7, 3)
    loss = lambda: (ops.linear_forward(x, w) * dy).sum()
    dw = np.zeros_like(w)
    dx = ops.linear_backward(dy, x, w, dw)
    assert_grad_close(dx, loss, x)
    assert_grad_close(dw, loss, w)


def rope_inputs(T=5, heads=3, Dh=8):
    cos, sin = ops.rope_tables(np, 16, Dh, 10000.0, np.float64)
    return randn(2, T, heads, Dh), cos[:T, None], sin[:T, None]


def test_rope_gradient():
    x, cos, sin = rope_inputs()
    dy = randn(*x.shape)
    loss = lambda: (ops.rope_forward(x, cos, sin) * dy).sum()
    assert_grad_close(ops.rope_backward(dy, cos, sin), loss, x)


def test_rope_matches_rotate_half_definition():
    x, cos, sin = rope_inputs()
    h = x.shape[-1] // 2
    rotate_half = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    np.testing.assert_allclose(ops.rope_forward(x, cos, sin), x * cos + rotate_half * sin, atol=1e-14)
    angle = 3 * 10000.0 ** (-2 * 1 / x.shape[-1])     # position 3, pair j = 1
    np.testing.assert_allclose(cos[3, 0, [1, 1 + h]], np.cos(angle))


def test_rope_scores_depend_only_on_offset():
    Dh = 16
    cos, sin = ops.rope_tables(np, 64, Dh, 10000.0, np.float64)
    q, k = randn(Dh), randn(Dh)

    def score(pq, pk):
        rq = ops.rope_forward(q[None, None, None], cos[pq:pq + 1, None], sin[pq:pq + 1, None])
        rk = ops.rope_forward(k[None, None, None], cos[pk:pk + 1, None], sin[pk:pk + 1, None])
        return float((rq * rk).sum())

    for offset in (0, 1, 7):
        scores = [score(p + offset, p) for p in (0, 5, 20, 40)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-10)
    assert abs(score(9, 0) - score(0, 0)) > 1e-3     # the offset does matter


@pytest.mark.parametrize("H,Hkv,first_pos", [(4, 1, 0), (4, 2, 0), (4, 4, 0), (2, 1, 3)])
def test_attention(H, Hkv, first_pos):
    B, T, Dh = 2, 4, 6
    S = first_pos + T
    q, k, v = randn(B, T, H, Dh), randn(B, S, Hkv, Dh), randn(B, S, Hkv, Dh)
    mask = ops.causal_mask(np, T, S, first_pos, H // Hkv, np.float64)
    dout = randn(B, T, H, Dh)
    loss = lambda: (ops.attention_forward(np, q, k, v, mask)[0] * dout).sum()
    _, cache = ops.attention_forward(np, q, k, v, mask)
    dq, dk, dv = ops.attention_backward(dout, cache)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert_grad_close(dq, loss, q)
    assert_grad_close(dk, loss, k)
    assert_grad_close(dv, loss, v)


def test_attention_matches_per_head_loop():
    # a plain reference: every query head separately, with its kv head h // G, causal softmax of q k^T / sqrt(Dh)
    B, T, H, Hkv, Dh = 2, 5, 6, 2, 4
    q, k, v = randn(B, T, H, Dh), randn(B, T, Hkv, Dh), randn(B, T, Hkv, Dh)
    out, _ = ops.attention_forward(np, q, k, v, ops.causal_mask(np, T, T, 0, H // Hkv, np.float64))
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            s = q[b, :, h] @ k[b, :, kv].T / np.sqrt(Dh)
            s[np.triu_indices(T, 1)] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(out[b, :, h], p @ v[b, :, kv], atol=1e-12)


def test_swiglu():
    gate, up, dy = randn(5, 7) * 3, randn(5, 7), randn(5, 7)
    loss = lambda: (ops.swiglu_forward(np, gate, up)[0] * dy).sum()
    _, cache = ops.swiglu_forward(np, gate, up)
    d_gate, d_up = ops.swiglu_backward(dy, cache)
    assert_grad_close(d_gate, loss, gate)
    assert_grad_close(d_up, loss, up)
    out, _ = ops.swiglu_forward(np, gate, up)
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-12)


def test_dropout():
    x, dy = randn(40, 50), randn(40, 50)
    keep = ops.dropout_mask(np, x.shape, 0.25, seed=7)
    loss = lambda: (ops.dropout_forward(x, 0.25, keep) * dy).sum()
    assert_grad_close(ops.dropout_backward(dy, 0.25, keep), loss, x)
    assert abs(keep.mean() - 0.75) < 0.03
    assert (ops.dropout_mask(np, x.shape, 0.25, seed=7) == keep).all()
    assert (ops.dropout_mask(np, x.shape, 0.25, seed=8) != keep).any()
    np.testing.assert_allclose(ops.dropout_forward(x, 0.25, keep)[keep], x[keep] / 0.75)
    assert ops.dropout_mask(np, x.shape, 0.0, seed=7).all()
    rows = ops.dropout_mask(np, (15, 50), 0.25, seed=7, first=25 * 50)     # rows 25..39 of the same mask
    np.testing.assert_array_equal(rows, keep[25:])


def test_tied_logits():
    h, embed, dy = randn(6, 8), randn(11, 8), randn(6, 11)
    loss = lambda: (ops.tied_logits_forward(h, embed) * dy).sum()
    d_embed = np.zeros_like(embed)
    dh = ops.tied_logits_backward(dy, h, embed, d_embed)
    assert_grad_close(dh, loss, h)
    assert_grad_close(d_embed, loss, embed)


@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.3])
def test_cross_entropy(z_loss):
    logits, targets = randn(9, 7) * 2 + 3, rng.integers(0, 7, 9)
    loss = lambda: ops.cross_entropy_forward(np, logits, targets, z_loss)[0]
    value, cache = ops.cross_entropy_forward(np, logits, targets, z_loss)
    assert_grad_close(ops.cross_entropy_backward(np, cache, z_loss), loss, logits)
    log_z = np.log(np.exp(logits).sum(-1))
    expected = np.mean(log_z - logits[np.arange(9), targets]) + z_loss * np.mean(log_z ** 2)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_embedding_with_repeated_tokens():
    embed, tokens = randn(5, 3), np.array([[1, 3, 1], [1, 0, 3]])
    dx = randn(2, 3, 3)
    loss = lambda: (ops.embedding_forward(embed, tokens) * dx).sum()
    d_embed = np.zeros_like(embed)
    ops.embedding_backward(np, d_embed, dx, tokens)
    assert_grad_close(d_embed, loss, embed)
    np.testing.assert_allclose(d_embed[1], dx[0, 0] + dx[0, 2] + dx[1, 0])
    np.testing.assert_allclose(d_embed[2], 0)


def test_keep_freed_memory_does_nothing_where_there_is_no_glibc(monkeypatch):
    # Windows' ctypes.CDLL(None) raises TypeError, macOS has no mallopt: the numpy backend must still come up
    import ctypes
    from tinypalm import backend
    for error in (TypeError("expected str"), OSError("no libc"), AttributeError("mallopt")):
        def no_libc(*args, error=error):
            raise error
        monkeypatch.setattr(ctypes, "CDLL", no_libc)
        backend.keep_freed_memory()
