"""On the CPU, a training batch cut into one piece per thread, each piece run through the whole model at once.

Why. Cutting every op into chunks for the threads (cpu_ops.py) hands work between threads hundreds of times per
step: each hand-over wakes a sleeping thread and passes Python's lock back and forth, and every piece of every
matmul packs the shared weight matrix again. A piece of the batch per thread hands over once per step: each
thread runs the forward and backward of its rows with every op on that one thread (cpu_ops.pool runs work that a
pool task asks for inline), and numpy and BLAS release Python's lock while they compute, so the threads really
run side by side.

The math is the model's. A piece's loss is the mean over its own positions, so the batch's loss is the pieces'
losses weighted by their share of the positions (of the counted positions, with a loss mask), and the gradients
add with the same weights: piece p's backward starts from its dlogits times its weight (`scale`). Dropout draws
each piece's rows of the batch's mask (`first_row`). Piece 0 adds into the caller's gradients, the others into
buffers of their own, added in piece order at the end, so the result does not depend on which thread ran which
piece; the number of pieces (one per thread, at most one per row) changes its rounding only.
"""

import threading

from . import cpu_ops
from .backend import map_ranges
from .optim import update_runs


def pieces(batch_size):
    """Row ranges cutting a batch into one piece per pool thread, as even as they go: [(start, stop)]."""
    n = 1 if cpu_ops.inline() else min(cpu_ops.pool.n_threads, batch_size)
    bounds = [round(p * batch_size / n) for p in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def loss_and_grads(model, tokens, targets, dropout, dropout_seed, grads, loss_mask):
    """model.loss_and_grads over the batch's rows cut into pieces, one per thread (arguments and result as there;
    grads is the caller's Flat, which the gradients are added to)."""
    rows = pieces(len(tokens))
    if len(rows) == 1:
        return model.batch_loss_and_grads(tokens, targets, dropout, dropout_seed, grads, loss_mask)
    if loss_mask is None:
        weights = [(b - a) / len(tokens) for a, b in rows]
    else:
        counted = [float(loss_mask[a:b].sum()) for a, b in rows]
        weights = [c / (sum(counted) or 1.0) for c in counted]     # counting nothing: loss 0, not 0 / 0
    trained = update_runs(model.layout, model.frozen)        # the stretches the backward writes: frozen ones not
    losses = [None] * len(rows)
    with _lock(model):                                       # threads sharing a model take turns with its buffers
        buffers = _piece_grads(model, len(rows) - 1, trained)

        def run(p):
            a, b = rows[p]
            piece_grads = grads if p == 0 else buffers[p - 1]
            mask = None if loss_mask is None else loss_mask[a:b]
            losses[p], _ = model.batch_loss_and_grads(tokens[a:b], targets[a:b], dropout, dropout_seed, piece_grads,
                                                      mask, scale=weights[p], first_row=a)
        cpu_ops.pool.run(run, range(len(rows)))

        _add_in_order(grads.flat, [g.flat for g in buffers], trained)
        if model.adapter is not None:
            _add_in_order(grads.adapter.flat, [g.adapter.flat for g in buffers], [(0, grads.adapter.flat.size)])
    loss = losses[0] * weights[0]
    for p in range(1, len(rows)):
        loss += losses[p] * weights[p]
    return loss, grads


def forward(model, tokens):
    """model.forward without a cache, the batch's rows cut into pieces, one per thread: logits (B, T, V)."""
    rows = pieces(len(tokens))
    if len(rows) == 1:
        logits, _ = model._forward(tokens)
        return logits.reshape(*tokens.shape, -1)
    out = [None] * len(rows)

    def run(p):
        a, b = rows[p]
        out[p], _ = model._forward(tokens[a:b])
    cpu_ops.pool.run(run, range(len(rows)))
    return model.xp.concatenate(out).reshape(*tokens.shape, -1)


def _lock(model):
    # a lock of the model's own (dict.setdefault is atomic under the GIL): threads that share a model take turns
    return model.__dict__.setdefault("_piece_lock", threading.Lock())


def _piece_grads(model, n, trained):
    """n gradient Flats for pieces 1.., zeroed in the trained ranges [(start, stop, ...)] (the only ones the
    backward writes and _add_in_order reads), kept on the model from step to step (allocating them anew costs as
    much as zeroing them, and page faults besides) while model.frozen stays the same (it decides their layout)."""
    if model.__dict__.get("_piece_grads_frozen") != model.frozen:
        model._piece_grads, model._piece_grads_frozen = [], model.frozen
    kept = model._piece_grads
    while len(kept) < n:
        kept.append(model.grads_like())

    def zero(a, b, *_):
        for g in kept[:n]:
            g.flat[a:b] = 0
    map_ranges(kept[0].flat, trained, zero)
    for g in kept[:n]:
        g.adapter = None                     # the model makes the adapters' gradients, if it has adapters
    return kept[:n]


def _add_in_order(total, parts, ranges):
    # total += parts[0] + parts[1] + ..., in that order for every element of ranges [(start, stop, ...)], in
    # chunks for the threads
    def add(a, b, *_):
        for part in parts:
            total[a:b] += part[a:b]
    map_ranges(total, ranges, add)
