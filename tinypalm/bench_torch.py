"""The same PaLM training step written in PyTorch eager, the peer that `python -m tinypalm.bench --vs-torch` times.

For benchmarking only: tinypalm never needs PyTorch (`pip install torch==2.13.0` gets the CPU build). The model
is tinypalm's exactly: parallel block with one shared LayerNorm (gain, no bias), the fused projections
w_in = [wq | wk | wv | w_gate | w_up] and w_out = [wo ; w_down], SwiGLU, multi-query attention
(scaled_dot_product_attention, causal, key/value heads shared), rotary embeddings (rotate-half), the tied
embedding with logits / sqrt(d_model), cross-entropy plus z-loss; then clip_grad_norm_ at 1.0 and AdamW
(betas 0.9, 0.95, eps 1e-8, decay 0.1 on the layers' matrices only), the same hyperparameters as tinypalm.bench.
"""

import contextlib
import math

from .errors import TinyPalmError


def import_torch():
    try:
        import torch
    except ImportError:
        raise TinyPalmError("--vs-torch needs PyTorch, which tinypalm does not depend on; install the CPU build "
                            "with `pip install torch==2.13.0` (benchmarking only)") from None
    return torch


def make_torch_step(cfg, batch_size, seq_len, dtype="float32", seed=0, weights=None, device="cpu"):
    """A function running one full PyTorch training step (forward, backward, clip, AdamW) and returning the loss.

    weights: tinypalm's stored arrays by storage name (model.params.stored), copied as the starting point, so
    both programs begin from the same model; random tokens from the same generator as tinypalm.bench.
    dtype "bfloat16" is mixed precision as in tinypalm: float32 parameters, gradients and AdamW, the products
    in bf16 under torch.autocast. device: "cpu", or "cuda" to time it against tinypalm's cupy backend."""
    torch = import_torch()
    import numpy
    F_ = torch.nn.functional
    mixed = dtype == "bfloat16"
    dt = torch.float32 if mixed else getattr(torch, dtype)
    rope_dt = torch.bfloat16 if mixed else dt           # autocast leaves products with constants alone
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if mixed else contextlib.nullcontext
    D, H, Hkv, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    Q, K = H * Dh, Hkv * Dh

    def param(array):
        return torch.nn.Parameter(torch.tensor(numpy.asarray(array, dtype=numpy.float64), dtype=dt, device=device))

    embed = param(weights["embed"])
    norms = [param(weights[f"layers.{i}.norm"]) for i in range(cfg.n_layers)]
    w_ins = [param(weights[f"layers.{i}.w_in"]) for i in range(cfg.n_layers)]
    w_outs = [param(weights[f"layers.{i}.w_out"]) for i in range(cfg.n_layers)]
    final_norm = param(weights["norm"])
    decayed, plain = w_ins + w_outs, [embed, final_norm] + norms
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    all_params = decayed + plain

    inv_freq = cfg.rope_base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = (a.to(device=device, dtype=rope_dt)[None, None] for a in (angles.cos(), angles.sin()))  # (1, 1, T, Dh)

    def rope(x):                                                   # x (B, nh, T, Dh)
        x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    rng = numpy.random.default_rng(seed)
    data = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1))
    tokens = torch.tensor(data[:, :-1], device=device)
    targets = torch.tensor(data[:, 1:], device=device).reshape(-1)
    B, T = tokens.shape

    def loss_fn():
        x = embed[tokens]                                          # (B, T, D)
        for norm, w_in, w_out in zip(norms, w_ins, w_outs):
            h = F_.layer_norm(x, (D,), norm, None, cfg.norm_eps)
            q, k, v, gate, up = (h @ w_in).split([Q, K, K, F, F], dim=-1)
            q = rope(q.view(B, T, H, Dh).transpose(1, 2))
            k = rope(k.view(B, T, Hkv, Dh).transpose(1, 2))
            v = v.view(B, T, Hkv, Dh).transpose(1, 2)
            attn = F_.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)   # (B, H, T, Dh)
            attn = attn.transpose(1, 2).reshape(B, T, Q)
            x = x + torch.cat([attn, F_.silu(gate) * up], dim=-1) @ w_out
        h = F_.layer_norm(x, (D,), final_norm, None, cfg.norm_eps)
        logits = (h @ embed.T).reshape(B * T, -1).float() / math.sqrt(D)
        log_z = torch.logsumexp(logits, dim=-1)
        return F_.cross_entropy(logits, targets) + cfg.z_loss * (log_z * log_z).mean()

    def step():
        with autocast():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step
