"""Named arrays stored back to back in one flat buffer.

The model keeps all its weights in one contiguous vector, and its gradients and the optimizer's moments in
vectors laid out the same way. Every name still has its own array, a view into the vector, but the optimizer,
gradient clipping and, across processes, the gradient all-reduce each work on long stretches of one vector
(a few array operations over each run of neighbours, one fused kernel on a GPU, a few bucketed all-reduces)
instead of one call per parameter.
"""

import math

from .errors import TinyPalmError


class Layout:
    """Where each stored array sits in a flat vector: `spans[name] = (start, stop)`, in storage order.

    `named(stored)` turns the stored arrays into the dict users see; by default it is the stored arrays
    themselves (the model maps its fused matrices to the canonical names here)."""

    def __init__(self, shapes, named=None):
        self.shapes, self.spans, start = dict(shapes), {}, 0
        for name, shape in self.shapes.items():
            self.spans[name] = (start, start + math.prod(shape))
            start += math.prod(shape)
        self.size = start
        self.named = named or dict

    def carve(self, flat):
        return {name: flat[a:b].reshape(self.shapes[name]) for name, (a, b) in self.spans.items()}

    def wrap(self, flat):
        return Flat(self, flat)

    def zeros(self, xp, dtype):
        return Flat(self, xp.zeros(self.size, dtype=dtype))


class Flat(dict):
    """A dict of views into one flat vector `.flat`; `.stored` holds the stored arrays by storage name.

    Write through the views in place (`p -= ...`, `p[...] = ...`) so they stay tied to the vector; assigning
    `flat[name] = array` copies the array in."""

    def __init__(self, layout, flat):
        self.layout, self.flat = layout, flat
        self.stored = layout.carve(flat)
        super().__init__(layout.named(self.stored))

    def __setitem__(self, name, value):
        # flat[name] = value writes value into the view, so the vector stays the one the model reads (replacing
        # the view would leave the model on the old values without a word)
        if name not in self:
            raise TinyPalmError(f"{name!r} is not one of these arrays; their names are fixed by the layout")
        view = self[name]
        if tuple(getattr(value, "shape", ())) != view.shape:
            raise TinyPalmError(f"{name} is {view.shape}; the value given is {tuple(getattr(value, 'shape', ()))}")
        view[...] = value

    def zeros_like(self, dtype=None):
        zeros = self.flat.astype(dtype or self.flat.dtype, copy=True)
        zeros[...] = 0
        return Flat(self.layout, zeros)


def flatten(xp, arrays, dtype=None):
    """A Flat holding copies of a dict of arrays, each stored under its own name."""
    layout = Layout({name: a.shape for name, a in arrays.items()})
    dtype = dtype or next(iter(arrays.values())).dtype
    out = layout.zeros(xp, dtype)
    for name, a in arrays.items():
        out[name][...] = a
    return out
