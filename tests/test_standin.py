"""The cupy code path, run on the CPU through a strict stand-in for CuPy (tests/standin/cupy).

The stand-in raises on implicit device-to-host reads, counts explicit ones by call site and follows CuPy's bf16
rules; see its docstring. Here: its rules themselves, the model on it (float32 identical to numpy, bf16 within the
bf16 tolerance of float64), the number of host reads per optimizer step and per generated token, and train.py,
sample.py and the bench end to end on it.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from tinypalm import Config, PaLM, ops
from tinypalm.backend import read_scalars
from tinypalm.generate import generate
from tinypalm.optim import AdamW, clip_grad_norm
from gradcheck import rel_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "tests", "standin")
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def cp(monkeypatch):
    """The stand-in, imported as `cupy` for the duration of one test (a real CuPy, if imported, comes back after)."""
    spec = importlib.util.spec_from_file_location("cupy", os.path.join(STANDIN, "cupy", "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupy.cuda", types.ModuleType("cupy.cuda"))
    spec.loader.exec_module(module)
    return module


def reads_here(cp):
    return sum(n for site, n in cp.reads.items() if "test_standin.py" in site)


# --- the stand-in's own rules ------------------------------------------------------------------------------------

def test_implicit_reads_raise_and_explicit_ones_are_counted(cp):
    a = cp.arange(4, dtype=np.float32)
    total = a.sum()
    for implicit in (lambda: np.asarray(a), lambda: float(total), lambda: bool(total > 1), lambda: total.item(),
                     lambda: f"{total:.2f}", lambda: int(a[0])):
        with pytest.raises(cp.ImplicitTransfer):
            implicit()
    mask = a > 1
    with pytest.raises(cp.ImplicitTransfer):
        a[mask] = 0                                          # CuPy finds the True entries on the host's behalf
    assert not cp.reads
    assert a.get().tolist() == [0, 1, 2, 3] and cp.asnumpy(total) == 6
    assert reads_here(cp) == 2
    with cp.allow_implicit():
        assert float(total) == 6.0
    assert reads_here(cp) == 3
    with pytest.raises(TypeError):
        a + np.ones(4, np.float32)                          # host and device arrays do not mix
    assert isinstance(a * np.float32(2), cp.ndarray) and isinstance(np.float32(2) * a, cp.ndarray)


def test_bf16_rules_are_cupys(cp):
    x = cp.asarray(np.ones((2, 3, 4)), dtype=BF16)
    w = cp.asarray(np.ones((4, 5)), dtype=BF16)
    assert (x[0] @ w).dtype == BF16                          # numpy would give float32
    with pytest.raises(TypeError):
        x @ w                                                # more than two dimensions
    with pytest.raises(TypeError):
        cp.einsum("ij,jk->ik", x[0], w)
    with pytest.raises(TypeError):
        cp.add.at(cp.zeros((3, 4), dtype=BF16), cp.asarray([0, 0]), x[0, :2])
    near_one = np.full(262_144, 1.0, dtype=BF16) + np.asarray(np.random.default_rng(0).random(262_144) * 0.01, BF16)
    device_mean = cp.asarray(near_one).mean()     # CuPy accumulates in float32 (numpy's bf16 mean gives 0.0078)
    assert device_mean.dtype == BF16 and abs(float(device_mean.get()) - 1.005) < 0.01
    assert (x * 0.5).dtype == np.float32 and (x * 2).dtype == BF16     # Python floats promote, ints do not


# --- the model on it ---------------------------------------------------------------------------------------------

CFG = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


def batch(B=3, T=12):
    data = np.random.default_rng(1).integers(0, 40, (B, T + 1))
    return data[:, :-1], data[:, 1:]


def plain_ops():
    """ops.py's functions alone, without the faster twins a backend lays over them."""
    return types.SimpleNamespace(**{name: f for name, f in vars(ops).items() if not name.startswith("_")
                                    and callable(f) and getattr(f, "__module__", None) == ops.__name__})


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_float32_on_the_standin_is_numpy_bit_for_bit(cp, n_kv_heads):
    # the same plain ops.py code on both: the stand-in changes no float32 arithmetic
    cfg = Config(n_kv_heads=n_kv_heads, **CFG)
    gpu, cpu = PaLM(cfg, "cupy", "float32", seed=2), PaLM(cfg, "numpy", "float32", seed=2)
    cpu.ops = plain_ops()
    cpu.split_batch = None                    # the batch in one piece, as on the GPU: the same sums in the same order
    assert isinstance(gpu.params.flat, cp.ndarray)
    x, y = batch()
    loss_gpu, grads_gpu = gpu.loss_and_grads(x, y, dropout=0.2, dropout_seed=4)
    loss_cpu, grads_cpu = cpu.loss_and_grads(x, y, dropout=0.2, dropout_seed=4)
    assert cp.asnumpy(loss_gpu) == loss_cpu
    np.testing.assert_array_equal(cp.asnumpy(grads_gpu.flat), grads_cpu.flat)


def test_bf16_on_the_standin_against_float64(cp):
    # CuPy's bf16 matmul rounds its result to bf16 where numpy's returns float32: same tolerance as on numpy
    gpu = PaLM(Config(n_kv_heads=1, **CFG), "cupy", "bfloat16", seed=2)
    ref = PaLM(Config(n_kv_heads=1, **CFG), "numpy", "float64", seed=2)
    ref.load_params({name: cp.asnumpy(w).astype(np.float64) for name, w in gpu.layout.wrap(gpu.weights.flat).items()})
    x, y = batch()
    loss_gpu, grads_gpu = gpu.loss_and_grads(x, y, dropout=0.2, dropout_seed=4)
    loss_ref, grads_ref = ref.loss_and_grads(x, y, dropout=0.2, dropout_seed=4)
    assert abs(float(cp.asnumpy(loss_gpu)) - loss_ref) < 5e-4 * loss_ref
    host = gpu.layout.wrap(cp.asnumpy(grads_gpu.flat))
    for name in grads_ref:
        assert rel_error(host[name], grads_ref[name]) < 2e-2, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_host_read_per_optimizer_step_none_per_parameter(cp, dtype):
    model = PaLM(Config(n_kv_heads=1, **CFG), "cupy", dtype, seed=0)
    optimizer = AdamW(model.params)
    x, y = batch()
    for step in range(3):
        cp.reset()
        loss, grads = 0.0, None
        for micro in range(2):                               # gradient accumulation adds no read either
            micro_loss, grads = model.loss_and_grads(x, y, 0.1, micro, grads=grads)
            loss += micro_loss / 2
        grad_norm = clip_grad_norm(grads, 0.5)
        optimizer.step(model.params, grads, 1e-3)
        model.params_updated()
        assert not cp.reads, cp.reads
        loss, grad_norm = read_scalars(model.xp, loss, grad_norm)
        assert sum(cp.reads.values()) == 1 and reads_here(cp) == 1, cp.reads
        assert np.isfinite(loss) and grad_norm > 0


def test_generation_reads_the_host_once_per_token(cp):
    model = PaLM(Config(n_kv_heads=1, **CFG), "cupy", "float32", seed=0)
    cp.reset()
    new = generate(model, [1, 2, 3], 10, temperature=0.8, seed=1)
    assert len(new) == 10
    assert list(cp.reads.values()) == [10] and "generate.py" in next(iter(cp.reads)), cp.reads


# --- the programs on it ------------------------------------------------------------------------------------------

def run_on_standin(args, cwd, report):
    env = {**os.environ, "PYTHONPATH": STANDIN + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUPY_STANDIN_REPORT": str(report), "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result, json.loads(report.read_text())["reads"]


@pytest.mark.parametrize("dtype,other", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_train_sample_and_bench_run_on_the_standin(tmp_path, dtype, other):
    # train in one dtype, sample that checkpoint in the other, bench in the first
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400)
    steps, evals, eval_steps, sample_tokens = 4, 2, 1, 4
    out, reads = run_on_standin(
        [os.path.join(ROOT, "train.py"), "--backend", "cupy", "--dtype", dtype, "--data", "text.txt",
         "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--grad-accum", "2", "--dropout", "0.1",
         "--max-steps", str(steps), "--eval-every", str(steps // evals), "--eval-steps", str(eval_steps),
         "--log-every", "2", "--sample-tokens", str(sample_tokens)], tmp_path, tmp_path / "train.json")
    assert f"cupy {dtype}" in out.stdout and "--- sample ---" in out.stdout
    in_loop = {site: n for site, n in reads.items() if site.split(":")[0].endswith("train.py")}
    assert list(in_loop.values()) == [steps], reads                  # one read per optimizer step, one place
    evaluating = {site: n for site, n in reads.items() if "evaluate.py" in site or site.endswith("(loss)")}
    assert sum(evaluating.values()) == evals * eval_steps, reads       # evaluation: one per batch
    sampling = {site: n for site, n in reads.items() if "generate.py" in site}
    assert sum(sampling.values()) == sample_tokens, reads              # sampling: one per token
    saving = {site: n for site, n in reads.items() if site not in {**in_loop, **evaluating, **sampling}}
    assert all("checkpoint.py" in site or "(params_numpy)" in site for site in saving), saving

    out, reads = run_on_standin([os.path.join(ROOT, "sample.py"), "--ckpt", "out", "--backend", "cupy",
                                 "--dtype", other, "--max-new-tokens", "5"], tmp_path, tmp_path / "sample.json")
    assert sum(reads.values()) == 5 and out.stdout.strip()
    out, reads = run_on_standin(["-m", "tinypalm.bench", "--backend", "cupy", "--dtype", dtype, "--preset",
                                 "tiny", "--batch-size", "2", "--seq-len", "8", "--steps", "2", "--warmup", "1"],
                                tmp_path, tmp_path / "bench.json")
    assert "MFU" in out.stdout and "where the time goes" in out.stdout and not reads


def test_mfu_reproduces_the_published_pytorch_figures():
    # the full preset at 1024 tokens on an H100 (989.4 TFLOP/s dense bf16): PyTorch eager bf16 ran 223k tokens/s
    # at 19.5% MFU and torch.compile 464k at 40.6%, by the same appendix-B formula
    from tinypalm.bench import mfu
    full = Config.preset("full")
    assert round(mfu(full, 1024, 223e3, 989.4), 3) == 0.195
    assert round(mfu(full, 1024, 464e3, 989.4), 3) == 0.406
