"""Every operation of the model as a forward/backward pair of plain functions.

A forward returns its output and a cache of what the backward needs; the backward takes the gradient of the
loss with respect to the output (d<name>) and returns the gradients of the inputs. Backwards that produce a
weight gradient accumulate into it, so a weight used twice (the tied embedding) just works.

`xp` is numpy or cupy, passed in by the model; nothing here asks which. Shapes: B batch, T positions,
S key positions, D d_model, H query heads, Hkv key/value heads, G = H // Hkv, Dh head_dim, F d_ff, V vocab,
N = B * T tokens; model.py adds Q = H * Dh and K = Hkv * Dh, the widths of the queries and of the keys (or values).

Dtypes follow the inputs. float64 and float32 compute in their own dtype. bfloat16 (mixed precision) is a storage
type only: every op reads its bf16 inputs into float32 (`_up`), does all its arithmetic there, matmuls included
(float32 accumulation), reduces with float32 sums, and casts its output back to bf16 once (`_down`). Weight
gradients accumulate into float32 buffers. Three bf16 traps shape the code: a Python float turns a bf16 array
into a float32 one (`x * 0.5`), numpy's bf16 `.sum()` accumulates in bf16, and CuPy's matmul on bf16 refuses
more than two dimensions (attention's products go through `_matmul`).
"""

import math

import numpy


def _up(a):
    # the array in its compute dtype: bf16 -> a float32 copy; float32 and float64 arrays as they are
    return a.astype(numpy.promote_types(a.dtype, numpy.float32), copy=False)


def _down(a, dtype):
    # the op's result in the activations' dtype: one cast for bf16, nothing for float32 and float64
    return a.astype(dtype, copy=False)


def _matmul(a, b):
    # a (..., M, K) @ b (..., K, N) -> (..., M, N) in the compute dtype, accumulated in float32 or better.
    # numpy's bf16 matmul already returns float32; CuPy's returns bf16, and raises TypeError on bf16 with more
    # than two dimensions, so 16-bit operands go through one 2-D product per leading index
    if a.ndim == 2 or a.dtype.itemsize > 2:
        return _up(a @ b)
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = _up(a3[:, :, :1]) * _up(b3[:, :1, :])        # an (n, M, N) float32 buffer, allocated without xp
    for i in range(len(out)):
        out[i] = a3[i] @ b3[i]
    return out.reshape(*a.shape[:-2], *out.shape[-2:])


# --- embedding --------------------------------------------------------------------------------------------

def embedding_forward(embed, tokens):
    # embed (V, D), tokens (B, T) int -> x (B, T, D)
    return embed[tokens]


def embedding_backward(xp, d_embed, dx, tokens):
    # a token repeated in the batch receives the sum of its rows' gradients: add.at, not assignment.
    # d_embed is the float32 gradient buffer in bf16 runs; dx goes up to it first (CuPy's add.at rejects bf16)
    xp.add.at(d_embed, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]).astype(d_embed.dtype, copy=False))


# --- LayerNorm without bias ---------------------------------------------------------------------------------

def layernorm_forward(x, gain, eps):
    # x (N, D), gain (D,) -> y (N, D); mean and biased variance over D, computed in two passes for accuracy.
    # The statistics are in the compute dtype; the cache keeps xhat in x's dtype and rstd (N, 1) in compute
    xf = _up(x)
    mean = xf.mean(axis=-1, keepdims=True)
    xc = xf - mean
    rstd = ((xc * xc).mean(axis=-1, keepdims=True) + eps) ** -0.5     # (N, 1)
    xhat = xc
    xhat *= rstd
    return _down(xhat * gain, x.dtype), (_down(xhat, x.dtype), rstd)


def layernorm_backward(dy, gain, d_gain, cache):
    # y = xhat * gain, xhat = (x - mean) * rstd. d_gain (D,) accumulates (None: a frozen gain, no gradient);
    # returns dx (N, D)
    xhat, rstd = cache
    dyf, xhat = _up(dy), _up(xhat)
    if d_gain is not None:
        d_gain += (dyf * xhat).sum(axis=0)
    dxhat = dyf * gain
    # the chain rule through the mean and the variance, both taken over D
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return _down(dx, dy.dtype)


# --- linear (no bias): y = x @ w ----------------------------------------------------------------------------

def linear_forward(x, w):
    # x (N, in), w (in, out) -> y (N, out)
    return _down(x @ w, x.dtype)


def linear_backward(dy, x, w, dw):
    # dw (in, out) accumulates x^T dy (None: a frozen weight, no gradient); returns dx = dy w^T. In bf16 runs dw
    # is float32: numpy's bf16 product is float32 already, CuPy's comes back rounded to bf16 (its CUDA twin
    # writes the float32 product directly)
    if dw is not None:
        dw += x.T @ dy
    return _down(dy @ w.T, dy.dtype)


def concat_columns(xp, parts):
    # parts (N, c_i) -> (N, sum of c_i): branch outputs side by side, the input of one product with fused weights
    return xp.concatenate(parts, axis=1)


# --- rotary position embedding, rotate-half convention ------------------------------------------------------

def rope_tables(xp, n_positions, head_dim, base, dtype):
    # angle[pos, j] = pos * base^(-2j/Dh) for j < Dh/2; dimension j pairs with j + Dh/2, so the tables repeat
    # the half-width angles twice -> cos, sin (n_positions, Dh)
    inv_freq = base ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)      # (Dh/2,)
    angles = xp.arange(n_positions, dtype=xp.float64)[:, None] * inv_freq[None, :]     # (P, Dh/2)
    angles = xp.concatenate([angles, angles], axis=-1)                                 # (P, Dh)
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def rope_forward(x, cos, sin):
    # x (B, T, nh, Dh), cos/sin (T, 1, Dh) in the compute dtype -> x * cos + rotate_half(x) * sin,
    # rotate_half(x) = concat(-x[Dh/2:], x[:Dh/2]) written into the two halves directly
    h = x.shape[-1] // 2
    xf = _up(x)
    out = xf * cos
    out[..., :h] -= xf[..., h:] * sin[..., :h]
    out[..., h:] += xf[..., :h] * sin[..., h:]
    return _down(out, x.dtype)


def rope_backward(dout, cos, sin):
    # the rotation is orthogonal: its transpose rotates by the opposite angle
    h = dout.shape[-1] // 2
    df = _up(dout)
    dx = df * cos
    dx[..., :h] += df[..., h:] * sin[..., h:]
    dx[..., h:] -= df[..., :h] * sin[..., :h]
    return _down(dx, dout.dtype)


# --- causal attention with shared key/value heads -----------------------------------------------------------

def causal_mask(xp, n_queries, n_keys, first_pos, groups, dtype):
    # additive mask (G*Tq, S): query row r sits at position first_pos + r % Tq and may see keys 0..that position.
    # dtype: the scores' (compute) dtype. xp.where, not mask[blocked] = -inf: boolean indexing reads the device
    q_pos = first_pos + xp.arange(n_queries)
    blocked = xp.arange(n_keys)[None, :] > q_pos[:, None]                               # (Tq, S)
    mask = xp.where(blocked, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))
    return xp.concatenate([mask] * groups, axis=0)


def attention_forward(xp, q, k, v, mask):
    # q (B, T, H, Dh), k/v (B, S, Hkv, Dh), mask (G*T, S) -> out (B, T, H, Dh)
    # Each kv head serves G consecutive query heads. Stacking those G heads along the rows gives one matmul
    # per (batch, kv head) against the shared keys: (G*T, Dh) @ (Dh, S); k and v are never repeated.
    # Scores and the softmax are in the compute dtype; the cache holds q (scaled), k, v and probs in q's dtype.
    B, T, H, Dh = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(Dh)
    qg = _down(_up(q) * scale, q.dtype)
    qg = qg.reshape(B, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, Dh)
    kt = k.transpose(0, 2, 3, 1)                                   # (B, Hkv, Dh, S)
    vt = v.transpose(0, 2, 1, 3)                                   # (B, Hkv, S, Dh)
    scores = _matmul(qg, kt)                                       # (B, Hkv, G*T, S)
    scores += mask
    probs = _down(softmax_forward(xp, scores), q.dtype)
    out = _matmul(probs, vt)                                       # (B, Hkv, G*T, Dh)
    out = _down(out, q.dtype).reshape(B, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
    return out, (qg, kt, vt, probs, scale)


def attention_backward(dout, cache):
    # returns dq (B, T, H, Dh), dk, dv (B, S, Hkv, Dh)
    qg, kt, vt, probs, scale = cache
    B, Hkv, GT, Dh = qg.shape
    T = dout.shape[1]
    G = GT // T
    dout_g = dout.reshape(B, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, GT, Dh)
    dprobs = _matmul(dout_g, vt.swapaxes(-1, -2))                  # (B, Hkv, G*T, S)
    dvt = _matmul(probs.swapaxes(-1, -2), dout_g)                  # (B, Hkv, S, Dh): summed over the G heads
    dscores = _down(softmax_backward(dprobs, probs), qg.dtype)
    dqg = _matmul(dscores, kt.swapaxes(-1, -2))                    # (B, Hkv, G*T, Dh)
    dkt = _matmul(qg.swapaxes(-1, -2), dscores)                    # (B, Hkv, Dh, S)
    dqg *= scale            # qg was scaled before the scores; kt was not, so dkt (from the scaled qg) has it already
    dq = _down(dqg, dout.dtype).reshape(B, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, Dh)
    return dq, _down(dkt, dout.dtype).transpose(0, 3, 1, 2), _down(dvt, dout.dtype).transpose(0, 2, 1, 3)


def softmax_forward(xp, scores):
    # over the last axis, in place on scores (the compute dtype); -inf entries become exactly 0
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def softmax_backward(dprobs, probs):
    # d scores_j = p_j * (dp_j - sum_i p_i dp_i); overwrites dprobs (the compute dtype; probs may be bf16)
    dprobs -= (dprobs * probs).sum(axis=-1, keepdims=True)
    dprobs *= probs
    return dprobs


# --- SwiGLU: silu(gate) * up --------------------------------------------------------------------------------

def swiglu_forward(xp, gate, up):
    # gate, up (N, F) -> hidden (N, F). sigmoid(a) = (1 + tanh(a/2)) / 2 never overflows
    gf = _up(gate)
    sig = xp.tanh(gf * 0.5)
    sig += 1.0
    sig *= 0.5
    silu = gf * sig
    dtype = gate.dtype
    return _down(silu * up, dtype), (gate, up, _down(sig, dtype), _down(silu, dtype))


def swiglu_backward(dhidden, cache):
    # silu'(a) = sig(a) * (1 + a * (1 - sig(a))); returns d_gate, d_up
    gate, up, sig, silu = cache
    dh, sig = _up(dhidden), _up(sig)
    d_up = dh * silu
    d_silu = dh * up
    d_gate = 1.0 - sig
    d_gate *= gate
    d_gate += 1.0
    d_gate *= sig
    d_gate *= d_silu
    return _down(d_gate, dhidden.dtype), _down(d_up, dhidden.dtype)


# --- dropout with a counter-based mask (identical on both backends, nothing to carry between steps) -----------

def _mix32(xp, h):
    # murmur3's 32-bit finaliser: every input bit affects every output bit
    h ^= h >> xp.uint32(16)
    h *= xp.uint32(0x85EBCA6B)
    h ^= h >> xp.uint32(13)
    h *= xp.uint32(0xC2B2AE35)
    h ^= h >> xp.uint32(16)
    return h


def dropout_mask(xp, shape, rate, seed, first=0):
    # boolean keep-mask (dropout_forward scales what it keeps by 1/(1-rate)): element i is dropped when
    # hash(seed, i) < rate * 2^32. first: the index of the mask's first element in a larger one, so that a piece
    # of a batch draws exactly its rows of the batch's mask
    n = math.prod(shape)
    key = _mix32(xp, xp.asarray([seed & 0xFFFFFFFF], dtype=xp.uint32))
    i = xp.arange(n, dtype=xp.uint32) + xp.uint32(first & 0xFFFFFFFF)       # uint32: wraps as the hash expects
    h = _mix32(xp, i * xp.uint32(0x9E3779B1) + key)
    keep = h >= xp.uint32(min(int(rate * 2**32), 2**32 - 1))
    return keep.reshape(shape)


def dropout_forward(x, rate, keep):
    # x (..), keep (..) bool -> x * keep / (1 - rate)
    return _down(_up(x) * keep * (1.0 / (1.0 - rate)), x.dtype)


def dropout_backward(dy, rate, keep):
    return _down(_up(dy) * keep * (1.0 / (1.0 - rate)), dy.dtype)


# --- tied output projection and the loss ---------------------------------------------------------------------

def tied_logits_forward(h, embed):
    # h (N, D), embed (V, D) -> logits (N, V) = h @ embed^T / sqrt(D), scaled before the cast to h's dtype
    logits = _up(h @ embed.T)
    logits *= 1.0 / math.sqrt(embed.shape[1])
    return _down(logits, h.dtype)


def tied_logits_backward(dlogits, h, embed, d_embed):
    # d_embed (V, D) accumulates dlogits^T h / sqrt(D) (the embedding's second use; None: frozen); returns
    # dh (N, D). The scale goes on the two (., D) products rather than on the (N, V) dlogits
    scale = 1.0 / math.sqrt(embed.shape[1])
    if d_embed is not None:
        d_embed_use = _up(dlogits.T @ h)
        d_embed_use *= scale
        d_embed += d_embed_use
    dh = _up(dlogits @ embed)
    dh *= scale
    return _down(dh, h.dtype)


def cross_entropy_forward(xp, logits, targets, z_loss):
    # logits (N, V), targets (N,) -> loss = mean(logZ - logit[target]) + z_loss * mean(logZ^2), logZ = logsumexp.
    # All in the compute dtype: probs is the one compute-dtype (float32 for bf16 logits) copy of the logits,
    # and the cache keeps it so, since p_target - 1 in the backward would lose its digits in bf16. The cache
    # keeps log_z in the logits' dtype: the backward needs it only for the z-loss factor 1 + 2 z logZ, where bf16
    # is plenty, and returns dlogits in its dtype.
    # The loss is a 0-d array (a numpy scalar on numpy) on the device: reading it is the caller's choice
    N = logits.shape[0]
    m = _up(logits.max(axis=-1, keepdims=True))                    # max is exact in any dtype
    probs = xp.exp(logits - m)                                     # (N, V), compute dtype
    total = probs.sum(axis=-1, keepdims=True)
    probs /= total
    log_z = xp.log(total) + m                                      # (N, 1)
    rows = xp.arange(N)
    nll = log_z[:, 0] - logits[rows, targets]
    loss = nll.mean() + z_loss * (log_z * log_z).mean()
    return loss, (probs, _down(log_z, logits.dtype), targets)


def cross_entropy_backward(xp, cache, z_loss):
    # d/dlogit_j [logZ - logit_t + z logZ^2] / N = (p_j (1 + 2 z logZ) - [j == t]) / N; returns dlogits (N, V)
    probs, log_z, targets = cache
    N = probs.shape[0]
    dlogits = probs * ((1.0 + 2.0 * z_loss * _up(log_z)) / N)
    dlogits[xp.arange(N), targets] -= 1.0 / N
    return _down(dlogits, log_z.dtype)


# --- masked cross-entropy: only the positions the mask counts (instruction tuning, evaluation windows) ----------

def masked_cross_entropy_forward(xp, logits, targets, loss_mask, z_loss):
    # logits (N, V), targets (N,), loss_mask (N,) 1 where a position counts, 0 where it does not ->
    # loss = sum_n m_n (logZ_n - logit_n[t_n] + z_loss logZ_n^2) / sum_n m_n: the mean over the counted positions
    # only, z-loss included. A batch that counts no position has loss 0 (and gradient 0), not 0/0.
    # Arithmetic in the compute dtype (float32 for 16-bit logits, else the logits' own); dlogits comes back in
    # the logits' dtype.
    N = logits.shape[0]
    compute = xp.promote_types(logits.dtype, xp.float32)
    m = logits.max(axis=-1, keepdims=True).astype(compute)
    probs = xp.exp(logits - m)                                     # (N, V), compute dtype
    total = probs.sum(axis=-1, keepdims=True)
    probs /= total
    log_z = (xp.log(total) + m)[:, 0]                              # (N,)
    nll = log_z - logits[xp.arange(N), targets]                    # (N,)
    weight = loss_mask.astype(compute)
    total = weight.sum()
    weight /= xp.where(total > 0, total, 1)                        # (N,): each counted position's share of the mean
    loss = (weight * (nll + z_loss * log_z * log_z)).sum()
    return loss, (probs, log_z, targets, weight, logits.dtype)


def masked_cross_entropy_backward(xp, cache, z_loss):
    # as cross_entropy_backward with 1/N replaced by each position's weight m_n / sum(m):
    # dlogit_nj = w_n (p_nj (1 + 2 z logZ_n) - [j == t_n]); returns dlogits (N, V), zero on uncounted rows
    probs, log_z, targets, weight, dtype = cache
    dlogits = probs * ((1.0 + 2.0 * z_loss * log_z) * weight)[:, None]
    dlogits[xp.arange(probs.shape[0]), targets] -= weight
    return dlogits.astype(dtype, copy=False)
