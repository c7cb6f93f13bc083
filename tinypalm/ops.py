"""Every operation of the model as a forward/backward pair of plain functions.

A forward returns its output and a cache of what the backward needs; the backward takes the gradient of the
loss with respect to the output (d<name>) and returns the gradients of the inputs. Backwards that produce a
weight gradient accumulate into it, so a weight used twice (the tied embedding) just works.

`xp` is numpy or cupy, passed in by the model; nothing here asks which. Shapes: B batch, T positions,
S key positions, D d_model, H query heads, Hkv key/value heads, G = H // Hkv, Dh head_dim, F d_ff, V vocab,
N = B * T tokens.
"""

import math


# --- embedding --------------------------------------------------------------------------------------------

def embedding_forward(embed, tokens):
    # embed (V, D), tokens (B, T) int -> x (B, T, D)
    return embed[tokens]


def embedding_backward(xp, d_embed, dx, tokens):
    # a token repeated in the batch receives the sum of its rows' gradients: add.at, not assignment
    xp.add.at(d_embed, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]))


# --- LayerNorm without bias ---------------------------------------------------------------------------------

def layernorm_forward(x, gain, eps):
    # x (N, D), gain (D,) -> y (N, D); mean and biased variance over D, computed in two passes for accuracy
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = ((xc * xc).mean(axis=-1, keepdims=True) + eps) ** -0.5     # (N, 1)
    xhat = xc
    xhat *= rstd
    return xhat * gain, (xhat, rstd)


def layernorm_backward(dy, gain, d_gain, cache):
    # y = xhat * gain, xhat = (x - mean) * rstd. d_gain (D,) accumulates; returns dx (N, D)
    xhat, rstd = cache
    d_gain += (dy * xhat).sum(axis=0)
    dxhat = dy * gain
    # the chain rule through the mean and the variance, both taken over D
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx


# --- linear (no bias): y = x @ w ----------------------------------------------------------------------------

def linear_forward(x, w):
    # x (N, in), w (in, out) -> y (N, out)
    return x @ w


def linear_backward(dy, x, w, dw):
    # dw (in, out) accumulates x^T dy; returns dx = dy w^T
    dw += x.T @ dy
    return dy @ w.T


# --- rotary position embedding, rotate-half convention ------------------------------------------------------

def rope_tables(xp, n_positions, head_dim, base, dtype):
    # angle[pos, j] = pos * base^(-2j/Dh) for j < Dh/2; dimension j pairs with j + Dh/2, so the tables repeat
    # the half-width angles twice -> cos, sin (n_positions, Dh)
    inv_freq = base ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)      # (Dh/2,)
    angles = xp.arange(n_positions, dtype=xp.float64)[:, None] * inv_freq[None, :]     # (P, Dh/2)
    angles = xp.concatenate([angles, angles], axis=-1)                                 # (P, Dh)
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def rope_forward(x, cos, sin):
    # x (B, T, nh, Dh), cos/sin (T, 1, Dh) -> x * cos + rotate_half(x) * sin,
    # rotate_half(x) = concat(-x[Dh/2:], x[:Dh/2]) written into the two halves directly
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h] -= x[..., h:] * sin[..., :h]
    out[..., h:] += x[..., :h] * sin[..., h:]
    return out


def rope_backward(dout, cos, sin):
    # the rotation is orthogonal: its transpose rotates by the opposite angle
    h = dout.shape[-1] // 2
    dx = dout * cos
    dx[..., :h] += dout[..., h:] * sin[..., h:]
    dx[..., h:] -= dout[..., :h] * sin[..., :h]
    return dx


# --- causal attention with shared key/value heads -----------------------------------------------------------

def causal_mask(xp, n_queries, n_keys, first_pos, groups, dtype):
    # additive mask (G*Tq, S): query row r sits at position first_pos + r % Tq and may see keys 0..that position
    q_pos = first_pos + xp.arange(n_queries)
    blocked = xp.arange(n_keys)[None, :] > q_pos[:, None]                               # (Tq, S)
    mask = xp.zeros((n_queries, n_keys), dtype=dtype)
    mask[blocked] = -xp.inf
    return xp.concatenate([mask] * groups, axis=0)


def attention_forward(xp, q, k, v, mask):
    # q (B, T, H, Dh), k/v (B, S, Hkv, Dh), mask (G*T, S) -> out (B, T, H, Dh)
    # Each kv head serves G consecutive query heads. Stacking those G heads along the rows gives one matmul
    # per (batch, kv head) against the shared keys: (G*T, Dh) @ (Dh, S); k and v are never repeated.
    B, T, H, Dh = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(Dh)
    qg = (q * scale).reshape(B, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, Dh)
    kt = k.transpose(0, 2, 3, 1)                                   # (B, Hkv, Dh, S)
    vt = v.transpose(0, 2, 1, 3)                                   # (B, Hkv, S, Dh)
    scores = qg @ kt                                               # (B, Hkv, G*T, S)
    scores += mask
    probs = softmax_forward(xp, scores)
    out = probs @ vt                                               # (B, Hkv, G*T, Dh)
    out = out.reshape(B, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
    return out, (qg, kt, vt, probs, scale)


def attention_backward(dout, cache):
    # returns dq (B, T, H, Dh), dk, dv (B, S, Hkv, Dh)
    qg, kt, vt, probs, scale = cache
    B, Hkv, GT, Dh = qg.shape
    T = dout.shape[1]
    G = GT // T
    dout_g = dout.reshape(B, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, GT, Dh)
    dprobs = dout_g @ vt.swapaxes(-1, -2)                          # (B, Hkv, G*T, S)
    dvt = probs.swapaxes(-1, -2) @ dout_g                          # (B, Hkv, S, Dh): summed over the G heads
    dscores = softmax_backward(dprobs, probs)
    dqg = dscores @ kt.swapaxes(-1, -2)                            # (B, Hkv, G*T, Dh)
    dkt = qg.swapaxes(-1, -2) @ dscores                            # (B, Hkv, Dh, S)
    dqg *= scale
    dq = dqg.reshape(B, Hkv, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, Dh)
    return dq, dkt.transpose(0, 3, 1, 2), dvt.transpose(0, 2, 1, 3)


def softmax_forward(xp, scores):
    # over the last axis, in place on scores; -inf entries become exactly 0
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def softmax_backward(dprobs, probs):
    # d scores_j = p_j * (dp_j - sum_i p_i dp_i); overwrites dprobs
    dprobs -= (dprobs * probs).sum(axis=-1, keepdims=True)
    dprobs *= probs
    return dprobs


# --- SwiGLU: silu(gate) * up --------------------------------------------------------------------------------

def swiglu_forward(xp, gate, up):
    # gate, up (N, F) -> hidden (N, F). sigmoid(a) = (1 + tanh(a/2)) / 2 never overflows
    sig = xp.tanh(gate * 0.5)
    sig += 1.0
    sig *= 0.5
    silu = gate * sig
    return silu * up, (gate, up, sig, silu)


def swiglu_backward(dhidden, cache):
    # silu'(a) = sig(a) * (1 + a * (1 - sig(a))); returns d_gate, d_up
    gate, up, sig, silu = cache
    d_up = dhidden * silu
    d_silu = dhidden * up
    d_gate = 1.0 - sig
    d_gate *= gate
    d_gate += 1.0
    d_gate *= sig
    d_gate *= d_silu
    return d_gate, d_up


# --- dropout with a counter-based mask (identical on both backends, nothing to carry between steps) -----------

def _mix32(xp, h):
    # murmur3's 32-bit finaliser: every input bit affects every output bit
    h ^= h >> xp.uint32(16)
    h *= xp.uint32(0x85EBCA6B)
    h ^= h >> xp.uint32(13)
    h *= xp.uint32(0xC2B2AE35)
    h ^= h >> xp.uint32(16)
    return h


def dropout_mask(xp, shape, rate, seed):
    # keep-mask scaled by 1/(1-rate): element i is dropped when hash(seed, i) < rate * 2^32
    n = math.prod(shape)
    key = _mix32(xp, xp.asarray([seed & 0xFFFFFFFF], dtype=xp.uint32))
    h = _mix32(xp, xp.arange(n, dtype=xp.uint32) * xp.uint32(0x9E3779B1) + key)
    keep = h >= xp.uint32(min(int(rate * 2**32), 2**32 - 1))
    return keep.reshape(shape)


def dropout_forward(x, rate, keep):
    # x (..), keep (..) bool -> x * keep / (1 - rate)
    return x * keep * (1.0 / (1.0 - rate))


def dropout_backward(dy, rate, keep):
    return dy * keep * (1.0 / (1.0 - rate))


# --- tied output projection and the loss ---------------------------------------------------------------------

def tied_logits_forward(h, embed):
    # h (N, D), embed (V, D) -> logits (N, V) = h @ embed^T / sqrt(D)
    logits = h @ embed.T
    logits *= 1.0 / math.sqrt(embed.shape[1])
    return logits


def tied_logits_backward(dlogits, h, embed, d_embed):
    # d_embed (V, D) accumulates dlogits^T h / sqrt(D) (the embedding's second use); returns dh (N, D)
    dlogits = dlogits * (1.0 / math.sqrt(embed.shape[1]))
    d_embed += dlogits.T @ h
    return dlogits @ embed


def cross_entropy_forward(xp, logits, targets, z_loss):
    # logits (N, V), targets (N,) -> loss = mean(logZ - logit[target]) + z_loss * mean(logZ^2), logZ = logsumexp
    N = logits.shape[0]
    m = logits.max(axis=-1, keepdims=True)
    probs = xp.exp(logits - m)
    total = probs.sum(axis=-1, keepdims=True)
    probs /= total
    log_z = xp.log(total) + m                                      # (N, 1)
    rows = xp.arange(N)
    nll = log_z[:, 0] - logits[rows, targets]
    loss = nll.mean() + z_loss * (log_z * log_z).mean()
    return loss, (probs, log_z, targets)


def cross_entropy_backward(xp, cache, z_loss):
    # d/dlogit_j [logZ - logit_t + z logZ^2] / N = (p_j (1 + 2 z logZ) - [j == t]) / N; returns dlogits (N, V)
    probs, log_z, targets = cache
    N = probs.shape[0]
    dlogits = probs * ((1.0 + 2.0 * z_loss * log_z) / N)
    dlogits[xp.arange(N), targets] -= 1.0 / N
    return dlogits


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
    weight /= xp.maximum(weight.sum(), 1)                          # (N,): each counted position's share of the mean
    loss = (weight * (nll + z_loss * log_z * log_z)).sum()
    return loss, (probs, log_z, targets, weight, logits.dtype)


def masked_cross_entropy_backward(xp, cache, z_loss):
    # as cross_entropy_backward with 1/N replaced by each position's weight m_n / sum(m):
    # dlogit_nj = w_n (p_nj (1 + 2 z logZ_n) - [j == t_n]); returns dlogits (N, V), zero on uncounted rows
    probs, log_z, targets, weight, dtype = cache
    dlogits = probs * ((1.0 + 2.0 * z_loss * log_z) * weight)[:, None]
    dlogits[xp.arange(probs.shape[0]), targets] -= weight
    return dlogits.astype(dtype, copy=False)
