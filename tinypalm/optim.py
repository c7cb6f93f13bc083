"""AdamW, global-norm gradient clipping, and the learning-rate schedule.

Parameters, gradients and both AdamW moments are flat vectors with one layout (flat.py), so a step is the same
dozen in-place array operations over each run of neighbouring arrays that share a weight-decay setting (cut into
chunks for the threads on numpy; one fused kernel on a GPU).
"""

import math

from .errors import TinyPalmError


def decays(name):
    """Weight decay applies to the layers' matrices, not to norm gains and not to the embedding.

    The embedding is excluded because its N(0, 1) scale is part of the design (no input scaling, logits scaled by
    1/sqrt(D)), and decay would shrink every step the rows of tokens that appear rarely while only the frequent
    ones get gradient to push back."""
    return name.startswith("layers.") and not name.endswith(".norm")


def update_runs(layout, frozen=(), decays=decays, shard=None):
    """[(start, stop, decayed)]: the stretches of the flat vector that AdamW updates, neighbours merged.

    Runs are taken over the stored arrays (the model's fused matrices), not the canonical views inside them.
    With shard=(start, stop), only what lies inside that stretch, counted from its start (ZeRO-1)."""
    unknown = set(frozen) - set(layout.spans)
    if unknown:
        raise ValueError(f"cannot freeze {sorted(unknown)}: not stored arrays of this layout")
    runs = []
    for name, (a, b) in layout.spans.items():
        if name in frozen:
            continue
        if runs and runs[-1][1] == a and runs[-1][2] == decays(name):
            runs[-1] = (runs[-1][0], b, runs[-1][2])
        else:
            runs.append((a, b, decays(name)))
    if shard is not None:
        lo, hi = shard
        runs = [(max(a, lo) - lo, min(b, hi) - lo, decayed) for a, b, decayed in runs if a < hi and b > lo]
    return runs


class AdamW:
    """Adam with bias-corrected moments and decoupled weight decay (Loshchilov & Hutter).

    p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), the decay only where `decays(name)`.
    `params` is a Flat (model.params); `frozen` names stored arrays that are left untouched (no update, no decay).
    The moments `m`, `v` are Flats laid out like the parameters.

    shard=(start, stop) keeps the moments of that stretch of the flat vector alone (ZeRO-1, tinypalm.dist): step()
    is then given objects whose `.flat` is that stretch of the parameters and of the gradients, and `m`, `v` have
    only `.flat`; state_dict and load_state_dict are for a whole AdamW only (dist gathers the shards into one)."""

    def __init__(self, params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, frozen=(), shard=None):
        if params.flat.dtype.itemsize < 4:     # a model built with trains=False keeps its bf16 weights alone
            raise TinyPalmError(f"AdamW updates float32 or float64 weights, not {params.flat.dtype}: build a bfloat16 "
                                "model that trains with trains=True (its float32 master weights)")
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.frozen = set(frozen)
        self.shard = shard
        self.runs = update_runs(params.layout, self.frozen, shard=shard)
        self.t = 0
        if shard is None:
            self.m, self.v = params.zeros_like(), params.zeros_like()
        else:
            self.m, self.v = (Stretch(params.flat[shard[0]:shard[1]]).zeros_like() for _ in range(2))
        from .backend import fused_adamw
        self.fused = fused_adamw(params.flat, self.runs) if shard is None else None   # one launch on a GPU

    def step(self, params, grads, lr):
        from .backend import array_module, map_ranges
        self.t += 1
        b1, b2, eps = self.beta1, self.beta2, self.eps
        m_correction, v_correction = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        decay = 1.0 - lr * self.weight_decay
        if self.fused is not None:
            return self.fused(params.flat, grads.flat, self.m.flat, self.v.flat, lr, b1, b2, eps, self.weight_decay,
                              self.t)
        xp = array_module(params.flat)

        def update(a, b, decayed):
            # one piece of the flat vectors, every pass in place or into one scratch array t
            p, g = params.flat[a:b], grads.flat[a:b]
            m, v = self.m.flat[a:b], self.v.flat[a:b]
            t = xp.empty_like(g)
            m *= b1
            m += xp.multiply(g, 1.0 - b1, out=t)                  # first moment
            v *= b2
            t = xp.multiply(g, g, out=t)
            t *= 1.0 - b2
            v += t                                                # second moment
            if self.weight_decay and decayed:
                p *= decay                                        # decoupled: not part of the gradient
            denom = xp.divide(v, v_correction, out=t)
            xp.sqrt(denom, out=denom)
            denom += eps
            step = xp.divide(m, denom, out=t)
            step *= lr / m_correction
            p -= step
        map_ranges(params.flat, self.runs, update)

    def state_dict(self):
        """Arrays only, so a checkpoint can hold them: 'step' and 'm.<name>', 'v.<name>' by canonical name."""
        state = {"step": self.t}
        state.update({f"m.{name}": m for name, m in self.m.items()})
        state.update({f"v.{name}": v for name, v in self.v.items()})
        return state

    def load_state_dict(self, state, xp):
        """Names missing from `state` (frozen in the run that saved it) start from zero."""
        self.t = int(state["step"])
        for moments, key in ((self.m, "m"), (self.v, "v")):
            moments.flat[...] = 0
            for name, array in moments.items():
                if f"{key}.{name}" in state:
                    array[...] = xp.asarray(state[f"{key}.{name}"])


class Stretch:
    """A stretch of a flat vector, given to AdamW.step in place of a whole Flat when the optimizer is sharded."""

    def __init__(self, flat):
        self.flat = flat

    def zeros_like(self):
        zeros = self.flat.copy()
        zeros[...] = 0
        return Stretch(zeros)


def clip_grad_norm(grads, max_norm):
    """Scale the gradients together so that their global L2 norm is at most max_norm; returns the norm before.

    grads is a Flat: one dot product over its vector."""
    return clip_together([grads.flat], max_norm)


def clip_together(vectors, max_norm):
    """clip_grad_norm over several gradient vectors at once (a classifier's head, runs of a model's gradients).

    Nothing is read back to the host: the norm is returned as a 0-d array (a numpy scalar on numpy) and the scale
    min(1, max_norm / norm) is applied on the device, so the training loop reads the norm together with the
    loss, one synchronisation per step."""
    total = sum(v @ v for v in vectors) ** 0.5
    if max_norm:
        scale = (max_norm / (total + 1e-6)).clip(0.0, 1.0)   # 1 when the norm is at most max_norm - 1e-6 (no 0 / 0)
        for v in vectors:
            v *= scale.astype(v.dtype)
    return total


def lr_at(step, max_lr, min_lr, warmup_steps, total_steps):
    """Linear warmup (step s, counted from 0, runs at max_lr * (s + 1) / warmup_steps, so the last warmup step runs
    at max_lr), then cosine decay to min_lr at total_steps, then flat.

    min_lr is a floor below max_lr, so the rate never exceeds max_lr; a floor above it is refused."""
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"min_lr {min_lr} must be between 0 and max_lr {max_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
