"""python -m tinypalm.bench: the order its comparison times the steps in, without PyTorch installed (a stand-in
peer records its calls), and its shape flags."""

import subprocess
import sys
import types

from tinypalm import bench, bench_torch


def test_vs_torch_alternates_idle_and_times_blocks_under_load(monkeypatch, capsys):
    calls = []
    busy = []

    def make_step(model, batch_size, seq_len):
        real = real_make_step(model, batch_size, seq_len)

        def step():
            calls.append("tinypalm")
            return real()
        return step

    def busy_processes(n):
        procs = real_busy_processes(n)
        busy.extend(procs)
        calls.append(f"{n} busy")
        return procs

    real_make_step, real_busy_processes = bench.make_step, bench.busy_processes
    monkeypatch.setattr(bench, "make_step", make_step)
    monkeypatch.setattr(bench, "busy_processes", busy_processes)
    monkeypatch.setattr(bench_torch, "import_torch", lambda: types.SimpleNamespace(__version__="peer",
                                                                                 get_num_threads=lambda: 1))
    monkeypatch.setattr(bench_torch, "make_torch_step", lambda *a, **k: lambda: calls.append("torch") or 7.0)

    bench.main(["--vs-torch", "--load", "1", "--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "8"])
    idle = ["tinypalm", "torch"] * 2 + ["tinypalm", "torch"] * 3      # first losses, warm-up, then in turn
    loaded = ["1 busy"] + ["tinypalm"] * 4 + ["torch"] * 4                     # each in a block of its own
    assert calls == idle + loaded
    assert busy and all(p.poll() is not None for p in busy)                    # the busy processes are gone
    out = capsys.readouterr().out
    assert "first step's loss: tinypalm " in out and ", torch 7.0000" in out
    assert "with load / without (medians): tinypalm" in out and "torch" in out.splitlines()[-1]


def test_shape_flags_time_that_shape_and_refuse_impossible_ones(capsys):
    bench.main(["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--steps", "1", "--warmup", "0",
                "--batch-size", "2", "--seq-len", "8"])
    header = capsys.readouterr().out.splitlines()[0]
    assert "(d_model 32, 1 layers, 2 heads, 1 kv, d_ff 128," in header           # head_dim and d_ff follow d_model
    bench.main(["--preset", "tiny", "--n-kv-heads", "2", "--steps", "1", "--warmup", "0", "--batch-size", "1",
                "--seq-len", "8"])
    assert "(d_model 64, 2 layers, 4 heads, 2 kv, d_ff 256," in capsys.readouterr().out.splitlines()[0]
    bench.main(["--n-heads", "3", "--head-dim", "32", "--d-ff", "96", "--steps", "1", "--warmup", "0",
                "--batch-size", "1", "--seq-len", "8"])
    assert "(d_model 128, 4 layers, 3 heads, 1 kv, d_ff 96," in capsys.readouterr().out.splitlines()[0]


def test_an_impossible_shape_is_one_line_and_status_2():
    done = subprocess.run([sys.executable, "-m", "tinypalm.bench", "--n-heads", "3"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: config: d_model 128 is not divisible by n_heads 3; change one of them or "
                                   "set head_dim explicitly")
