"""numpy vs cupy: the same forward, loss and every gradient. Runs only where CuPy sees a GPU."""

import numpy as np
import pytest

from tinypalm import Config, PaLM

try:
    import cupy
    HAS_GPU = cupy.is_available()
except Exception:          # not installed, or its CUDA libraries are missing
    HAS_GPU = False

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy and a CUDA GPU")


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_numpy_and_cupy_agree(n_kv_heads, dtype, tol):
    cfg = Config(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=16)
    cpu, gpu = PaLM(cfg, "numpy", dtype, seed=5), PaLM(cfg, "cupy", dtype, seed=5)
    for name in cpu.params:
        np.testing.assert_array_equal(cpu.params[name], cupy.asnumpy(gpu.params[name]))   # same seed, same init
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 50, (3, 12)), rng.integers(0, 50, (3, 12))
    np.testing.assert_allclose(cupy.asnumpy(gpu.forward(tokens)), cpu.forward(tokens), rtol=tol, atol=tol)
    loss_cpu, grads_cpu = cpu.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=3)
    loss_gpu, grads_gpu = gpu.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=3)
    assert abs(loss_cpu - loss_gpu) < tol * abs(loss_cpu)
    for name in grads_cpu:
        g, ref = cupy.asnumpy(grads_gpu[name]), grads_cpu[name]
        assert np.linalg.norm(g - ref) <= tol * np.linalg.norm(ref), name
