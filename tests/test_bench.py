"""python -m tinypalm.bench: the order its comparison times the steps in, without PyTorch installed (a stand-in
peer records its calls), and its shape flags."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from tinypalm import bench, bench_torch, cpu_ops


def _process_state(pid):
    # the state letter in /proc/PID/stat: R running, S sleeping, T stopped, ...
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _watch_bench(monkeypatch, on_step, on_start=lambda procs: None):
    """From here on, bench.main calls on_step() before each of tinypalm's steps, and on_start(procs) on the busy
    processes it starts. Returns the list of every busy process started, filled as the bench starts them."""
    busy = []
    real_busy_processes, real_make_step = bench.busy_processes, bench.make_step

    def busy_processes(n):
        procs = real_busy_processes(n)
        on_start(procs)
        busy.extend(procs)
        return procs

    def make_step(model, batch_size, seq_len):
        real = real_make_step(model, batch_size, seq_len)

        def step():
            on_step()
            return real()
        return step
    monkeypatch.setattr(bench, "busy_processes", busy_processes)
    monkeypatch.setattr(bench, "make_step", make_step)
    return busy


def _load(busy):
    # what the busy processes were doing: "none" before any started, else all "stopped" or all "running" (or still
    # starting up)
    if not busy:
        return "none"
    states = {"stopped" if _process_state(p.pid) == "T" else "running" for p in busy}
    assert len(states) == 1, states
    return states.pop()


LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not bench.PAUSABLE or not LINUX,
                    reason="stopping the load for every other step needs SIGSTOP, and reading the processes' state /proc (Linux)")
def test_vs_torch_alternates_idle_and_times_blocks_under_load_stopped_for_every_other_step(monkeypatch, capsys):
    calls = []
    busy = _watch_bench(monkeypatch, lambda: calls.append(("tinypalm", _load(busy))),
                        on_start=lambda procs: calls.append(f"{len(procs)} busy"))
    monkeypatch.setattr(bench_torch, "import_torch", lambda: types.SimpleNamespace(__version__="peer",
                                                                                 get_num_threads=lambda: 1))
    monkeypatch.setattr(bench_torch, "make_torch_step", lambda *a, **k: lambda: calls.append(("torch", _load(busy))) or 7.0)

    bench.main(["--vs-torch", "--load", "2", "--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "8"])
    idle = [("tinypalm", "none"), ("torch", "none")] * 5          # first losses, warm-up, then in turn
    loaded = ["2 busy"]
    for name in ("tinypalm", "torch"):      # each in a block of its own: warm-up, then without and with load in turn
        loaded += [(name, "running")] + [(name, "stopped"), (name, "running")] * 3
    assert calls == idle + loaded
    assert len(busy) == 2 and all(p.poll() is not None for p in busy)         # the busy processes are gone
    out = capsys.readouterr().out
    assert "first step's loss: tinypalm " in out and ", torch 7.0000" in out
    slowdown = next(line for line in out.splitlines() if "with load / without" in line)
    for name in ("tinypalm", "torch"):      # the medians of its steps with and without load, and their ratio
        with_load, without, ratio = map(float, re.search(name + r" ([\d.]+) / ([\d.]+) ms = ([\d.]+)x", slowdown).groups())
        assert ratio > 0 and (name == "torch" or ratio == pytest.approx(with_load / without, rel=0.02))
    # the share of the cores tinypalm's threads got in each phase, and the fair share they could have had
    for label in ("no load", "2 busy"):
        line = next(line for line in out.splitlines() if line.strip().startswith(label + ":"))
        cores, cpu_ms = map(float, re.search(r"tinypalm's threads on ([\d.]+) cores, ([\d.]+) ms CPU a step", line).groups())
        assert 0 < cores <= cpu_ops.pool.n_threads * 1.05 and cpu_ms > 0
    threads, n_cores = cpu_ops.pool.n_threads, cpu_ops.default_cores()
    fair = threads * min(1.0, n_cores / (threads + 2))
    assert f"a fair share for {threads} threads beside 2 busy processes on {n_cores} cores: {fair:.2f})" in out


@pytest.mark.skipif(not LINUX, reason="reads the busy processes' state in /proc (Linux)")
def test_without_sigstop_the_load_runs_throughout_and_the_slowdown_is_against_the_steps_before_it(monkeypatch, capsys):
    # Windows has no SIGSTOP: every step of the block runs beside the load, and the steps without it are the first
    # phase's
    states = []
    busy = _watch_bench(monkeypatch, lambda: states.append(_load(busy)))
    monkeypatch.setattr(bench, "PAUSABLE", False)
    bench.main(["--load", "1", "--steps", "3", "--warmup", "1", "--batch-size", "1", "--seq-len", "8"])
    assert states == ["none"] * 4 + ["running"] * 4
    assert busy[0].poll() is not None
    out = capsys.readouterr().out.splitlines()
    idle_median = float(re.search(r"no load: tinypalm median ([\d.]+) ms", out[1]).group(1))
    assert "; the load running throughout, the steps without it from above): tinypalm" in out[3]
    assert float(re.search(r"/ ([\d.]+) ms = ", out[3]).group(1)) == idle_median


@pytest.mark.skipif(not bench.PAUSABLE or not LINUX,
                    reason="SIGSTOP and SIGCONT (not on Windows), and /proc to read a process's state (Linux)")
def test_an_interrupted_bench_lets_the_stopped_busy_processes_run_before_it_ends_them(monkeypatch):
    # a stopped process does not act on SIGTERM until it runs again: the bench would hang waiting for it
    states_at_terminate, steps = [], []

    def watch_terminate(procs):
        for proc in procs:
            def terminate(proc=proc, real=proc.terminate):
                states_at_terminate.append(_process_state(proc.pid))
                os.kill(proc.pid, signal.SIGCONT)          # so that a failing bench fails here rather than hangs
                real()
            proc.terminate = terminate

    def step():             # interrupted in the block with load, at a step the busy processes are stopped for
        steps.append(_load(busy))
        if len(steps) == 3:
            raise KeyboardInterrupt
    busy = _watch_bench(monkeypatch, step, on_start=watch_terminate)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--load", "1", "--steps", "2", "--warmup", "0", "--batch-size", "1", "--seq-len", "8"])
    assert steps == ["none", "none", "stopped"]
    assert len(states_at_terminate) == 1 and states_at_terminate[0] != "T"
    assert busy[0].wait(timeout=10) is not None


@pytest.mark.skipif(not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clocks on this platform")
def test_thread_cpu_seconds_counts_the_pool_workers_too(monkeypatch):
    # two tasks that each burn 50 ms of CPU, one on the caller's thread and one on a worker (the caller's waits
    # until the worker has taken the other): the clocks must count both, not only the caller's 50 ms
    monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(2))
    worker_started = threading.Event()

    def burn(_):
        if threading.current_thread() is threading.main_thread():
            assert worker_started.wait(10)
        else:
            worker_started.set()
        start = time.thread_time()
        while time.thread_time() - start < 0.05:
            pass
    before, caller_before = bench.thread_cpu_seconds(), time.thread_time()
    cpu_ops.pool.run(burn, [0, 1])
    caller = time.thread_time() - caller_before
    assert 0.05 <= caller < 0.09 and bench.thread_cpu_seconds() - before >= caller + 0.05


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
