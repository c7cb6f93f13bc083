"""Central finite differences in float64, shared by the gradient tests."""

import numpy as np


def numerical_grad(f, x, eps=1e-5, indices=None):
    """d f() / d x by central differences, perturbing x in place; only at `indices` (flat) if given.

    x may be a strided view (the model's canonical weights are), so elements are addressed by their
    multi-index rather than through a reshape, which would copy."""
    grad = np.zeros(x.shape)
    for i in range(x.size) if indices is None else indices:
        at = np.unravel_index(i, x.shape)
        old = x[at]
        x[at] = old + eps
        plus = f()
        x[at] = old - eps
        minus = f()
        x[at] = old
        grad[at] = (plus - minus) / (2 * eps)
    return grad


def rel_error(a, b):
    """Relative error of two arrays as a whole: |a - b| / max(|a|, |b|), with L2 norms."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return np.linalg.norm(a - b) / scale if scale > 0 else 0.0


def assert_grad_close(analytic, f, x, tol=1e-6, eps=1e-5):
    """Every element of x: analytic gradient against central differences."""
    numeric = numerical_grad(f, x, eps)
    err = rel_error(analytic, numeric)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    assert np.linalg.norm(numeric) > 0, "the check is vacuous: the numerical gradient is zero"
