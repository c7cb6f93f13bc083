"""A training run's housekeeping, in process: the lr floor, save scheduling, time left, memory, leftovers, --help."""

import argparse
import errno
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinypalm import Config, PaLM, TinyPalmError, checkpoint, cpu_ops, files, run
from tinypalm.bench import build_parser as bench_parser
from tinypalm.generate import generate
from tinypalm.optim import AdamW, lr_at
from tinypalm.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_parser(name):
    return script(name).build_parser()


@pytest.mark.parametrize("max_lr,min_lr,warmup,total", [(1e-4, 1e-5, 3, 20), (2e-3, 2e-3, 0, 10), (1e-4, 0.0, 50, 10),
                                                        (3e-4, 1e-4, 0, 1)])
def test_lr_never_exceeds_max_lr_and_ends_at_the_floor(max_lr, min_lr, warmup, total):
    rates = [lr_at(s, max_lr, min_lr, warmup, total) for s in range(3 * total + warmup)]
    assert max(rates) <= max_lr and min(rates) >= 0
    assert rates[-1] == min_lr or warmup > total
    assert all(b <= a for a, b in zip(rates[warmup:], rates[warmup + 1:]))     # no climb after warmup


def test_lr_floor_above_the_peak_is_refused():
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, 1e-4, 2e-4, 10, 100)


def test_resuming_with_an_lr_below_the_runs_own_floor_is_refused(tmp_path):
    model = PaLM(Config(**{**Config.preset("tiny").to_dict(), "vocab_size": 257}), seed=0)   # the byte tokenizer's 257 ids
    train_args = {"lr": 2e-3, "min_lr": 2e-4, "max_steps": 10}
    checkpoint.save(str(tmp_path / "last.npz"), model, ByteTokenizer(), 5, AdamW(model.params), train_args)
    train = script("train")
    with pytest.raises(TinyPalmError, match="--lr 0.0001 is below the --min-lr 0.0002 this run was started with"):
        train.parse_run(["--resume", "--out", str(tmp_path), "--lr", "1e-4"])
    args, _, ckpt = train.parse_run(["--resume", "--out", str(tmp_path), "--lr", "1e-4", "--min-lr", "1e-5"])
    assert (args.lr, args.min_lr, ckpt.step) == (1e-4, 1e-5, 5)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_save_schedule_waits_its_interval_and_stays_cheap():
    clock = FakeClock()
    schedule = run.SaveSchedule(60, clock)
    clock.now = 59
    assert not schedule.due()
    clock.now = 60
    assert schedule.due()
    schedule.saved(took=10.0)                     # a slow save: the next one waits 20 x 10 s, not 60 s
    clock.now = 60 + 199
    assert not schedule.due()
    clock.now = 60 + 200
    assert schedule.due()
    never = run.SaveSchedule(0, clock)
    clock.now = 1e9
    assert not never.due()


def test_time_left_uses_every_step_so_far():
    progress = run.Progress()
    progress.add(10, 10.0)                        # 1 s per step
    progress.add(10, 10.0)
    progress.add(10, 40.0)                        # one interval slowed down by other programs
    assert progress.left(100) == pytest.approx(100 * 60.0 / 30)      # 200 s, not the last interval's 400 s
    assert run.Progress().left(5) == 0.0


def test_memory_estimate_and_refusal(monkeypatch):
    cfg = Config.preset("palm-8b", vocab_size=256)
    need = run.training_bytes(cfg, 16, 128, "float32")
    assert need > 16 * cfg.n_params()             # weights, gradients and two moments, plus activations
    model = PaLM(Config.preset("tiny"), seed=0)
    weights = sum(p.nbytes for p in model.params.values())
    assert run.training_bytes(model.config, 4, 16, "float32") > 4 * weights
    monkeypatch.setattr(run, "available_bytes", lambda backend: (64 * 2**30, "free"))
    monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(3))     # numpy: a gradient buffer per piece of the batch
    need = run.training_bytes(cfg, 16, 128, "float32", gradient_buffers=3)
    assert need == run.training_bytes(cfg, 16, 128, "float32") + 2 * 4 * cfg.n_params()
    expected = f"--preset palm-8b ({cfg.n_params() / 1e9:.2f}B parameters) needs about {need / 2**30:.1f} GiB"
    with pytest.raises(TinyPalmError, match=re.escape(expected) + r" .*3 gradient buffers.* has only 64.0 GiB of memory free"):
        run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b")
    run.check_memory(Config.preset("small"), "numpy", 16, 128, "float32", "--preset small")        # fits: no error
    # LoRA: the base has neither gradients nor moments, so what it needs beyond the activations is the weights
    lora = run.training_bytes(cfg, 16, 128, "float32", gradient_buffers=3, base_trains=False)
    assert lora == run.training_bytes(cfg, 16, 128, "float32") - 3 * 4 * cfg.n_params()
    monkeypatch.setattr(run, "available_bytes", lambda backend: (lora + 2**20, "free"))
    run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b", base_trains=False)       # fits: no error
    with pytest.raises(TinyPalmError, match=r"3 gradient buffers.*AdamW state and activations at batch 16 x 128"):
        run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b", base_trains=True)
    monkeypatch.setattr(run, "available_bytes", lambda backend: (lora - 2**20, "free"))
    with pytest.raises(TinyPalmError, match=r"for weights, activations \(LoRA\) at batch 16 x 128"):
        run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b", base_trains=False)
    # the processes of an mpiexec run on one machine share its memory; on GPUs each rank has its own
    monkeypatch.setattr(run, "available_bytes", lambda backend: (2 * lora - 2**20, "free"))
    run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b", base_trains=False)        # one: fits
    with pytest.raises(TinyPalmError, match=r"in each of the 2 processes on this machine.*or fewer processes"):
        run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b", base_trains=False, ranks_here=2)
    run.check_memory(cfg, "cupy", 16, 128, "float32", "--preset palm-8b", base_trains=False, ranks_here=2)
    # bfloat16: a float32 master, gradients and moments beside the bf16 weights; LoRA's base is the bf16 weights
    # alone; the layers' activations in bf16 (half of float32's), the logits' at float32's 4 bytes
    activations = run.training_bytes(cfg, 16, 128, "float32") - 16 * cfg.n_params()
    bf16_activations = run.training_bytes(cfg, 16, 128, "bfloat16") - 18 * cfg.n_params()
    logits = 16 * 128 * 3 * cfg.vocab_size * 4
    assert bf16_activations == (activations - logits) // 2 + logits
    assert run.training_bytes(cfg, 16, 128, "bfloat16", base_trains=False) == 2 * cfg.n_params() + bf16_activations
    assert run.training_bytes(cfg, 16, 128, "float64") == 2 * run.training_bytes(cfg, 16, 128, "float32")
    # attention by tiles keeps no attention weights: n_layers x n_heads x T of them per token, 2 bytes each in bf16
    tiles = run.training_bytes(cfg, 16, 128, "bfloat16", attention_matrix=False)
    assert run.training_bytes(cfg, 16, 128, "bfloat16") - tiles == 16 * 128 * cfg.n_layers * cfg.n_heads * 128 * 2
    assert not run.attention_by_tiles(cfg, "numpy", "bfloat16") and not run.attention_by_tiles(cfg, "cupy", "float32")
    monkeypatch.setattr(run, "available_bytes", lambda backend: None)                       # unknown: no refusal
    run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b")


def test_memory_estimate_covers_what_an_h200_held():
    # python -m tinypalm.bench --backend cupy --preset full --dtype bfloat16 --batch-size 16 --seq-len 1024 on an
    # H200 (2026-11-26): CuPy's pool held 15.73 GiB with attention through cuBLAS, 10.32 GiB through flash.cu. The
    # estimate must not be below either (it would let through what cannot fit), nor far above (it would refuse
    # batches that fit)
    full = Config.preset("full")
    for attention_matrix, held in ((True, 15.73), (False, 10.32)):
        need = run.training_bytes(full, 16, 1024, "bfloat16", attention_matrix=attention_matrix) / 2**30
        assert held < need < 2 * held, (attention_matrix, need)


def test_available_memory_is_read_from_the_system():
    have, kind = run.available_bytes("numpy") or (None, None)
    if os.path.exists("/proc/meminfo"):                 # Linux: MemAvailable, in bytes
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        assert abs(have - kib * 1024) < 2**30 and kind == "free"
    assert have is None or have > 2**20


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    stale, live = tmp_path / f"last.npz.tmp{finished.pid}", tmp_path / f"best.npz.tmp{os.getppid()}"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    (tmp_path / "notes.tmp123").write_text("not ours")
    removed = files.remove_stale_temporaries(str(tmp_path))
    assert removed == [(str(stale), 1000)]
    assert not stale.exists() and live.exists() and (tmp_path / "notes.tmp123").exists()
    assert files.remove_stale_temporaries(str(tmp_path / "missing")) == []
    # the temporaries of one file, whatever its name: a token file's, a merged checkpoint's
    tok, other = tmp_path / f"corpus.tok.tmp{finished.pid}", tmp_path / f"corpus.tokens.tmp{finished.pid}"
    tok.write_bytes(b"z" * 10)
    other.write_bytes(b"z")
    assert files.remove_stale_temporaries_of(str(tmp_path / "corpus.tok")) == [(str(tok), 10)]
    assert other.exists() and live.exists()


def test_nan_weights_are_refused_at_sampling():
    model = PaLM(Config.preset("tiny", max_seq_len=16), dtype="float64", seed=0)
    model.params["layers.1.w_up"][0, 0] = np.nan
    with pytest.raises(TinyPalmError, match="NaN or infinite"):
        generate(model, [1, 2], 3)


@pytest.mark.parametrize("parser", [lambda: script_parser("train"), lambda: script_parser("sample"), bench_parser],
                         ids=["train.py", "sample.py", "bench"])
def test_every_flag_has_help_and_shows_its_default(parser):
    p = parser()
    text = p.format_help()
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in p._get_formatter()._get_help_string(action), action.option_strings
    for flag in ("--lr", "--batch-size", "--max-steps", "--seq-len", "--out", "--max-new-tokens", "--temperature"):
        action = next((a for a in p._actions if flag in a.option_strings), None)
        if action is not None:
            assert f"(default: {action.default})" in " ".join(text.split()), flag


def test_run_cli_turns_os_errors_and_ctrl_c_into_exit_statuses(capsys):
    from tinypalm.cli import run_cli

    def full_disk():
        raise OSError(28, "No space left on device", "out/metrics.jsonl")

    def ctrl_c():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit:
        run_cli(full_disk)
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: out/metrics.jsonl: No space left on device; free some disk space\n"
    for errno_, advice in ((errno.ENOENT, "check the path (its directory must exist)"),
                           (errno.EISDIR, "give a file name, not a directory"), (errno.EACCES, "check the permissions")):
        def fail():
            raise OSError(errno_, os.strerror(errno_), "out/x.npz")
        with pytest.raises(SystemExit) as exit:
            run_cli(fail)
        assert exit.value.code == 2
        assert capsys.readouterr().err == f"error: out/x.npz: {os.strerror(errno_)}; {advice}\n"
    with pytest.raises(SystemExit) as exit:
        run_cli(ctrl_c)
    assert exit.value.code == 130


def test_ctrl_c_message_while_a_print_is_under_way(monkeypatch):
    # the signal lands inside a print to stdout (here: during the buffered writer's flush): the handler's own
    # message must not print into the same stream again, which raises "reentrant call"
    read_end, write_end = os.pipe()
    stop = None

    class Raw(io.RawIOBase):
        def writable(self):
            return True

        def fileno(self):
            return write_end

        def write(self, data):
            if not stop.requested:
                stop.handle(signal.SIGINT, None)
            return os.write(write_end, data)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(Raw())))
    stop = run.StopRequest()
    try:
        print("step 3/100", flush=True)
    finally:
        stop.release()
        os.close(write_end)
    with os.fdopen(read_end) as pipe:
        written = pipe.read()
    assert stop.requested
    assert "Ctrl-C: finishing this step, saving and stopping" in written and "step 3/100" in written


def test_a_run_that_arrives_in_a_new_out_while_another_starts_is_not_replaced(tmp_path):
    out = str(tmp_path / "out")
    replaced = run.prepare_out_dir(out, resume=False, overwrite=False)        # no --out yet: nothing to protect
    os.makedirs(out)
    (tmp_path / "out" / "best.npz").write_bytes(b"another run's")            # which then finishes first
    with pytest.raises(TinyPalmError, match="--out .* received a trained run \\(best.npz\\) from another train.py"):
        run.start_out_dir(out, replaced)
    assert (tmp_path / "out" / "best.npz").read_bytes() == b"another run's"


def test_available_memory_without_proc_meminfo(monkeypatch):
    # macOS: no /proc/meminfo and no free-page count, but the whole memory bounds a run all the same
    import builtins
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", no_proc)
    sizes = {"SC_PHYS_PAGES": 4 * 2**20, "SC_PAGESIZE": 4096}

    def sysconf(name):
        if name not in sizes:
            raise ValueError(f"unrecognized configuration name {name}")
        return sizes[name]
    monkeypatch.setattr(run.os, "sysconf", sysconf)
    assert run.available_bytes("numpy") == (16 * 2**30, "in all")
    cfg = Config.preset("palm-8b")
    with pytest.raises(TinyPalmError, match=r"has only 16.0 GiB of memory in all"):
        run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b")
    sizes.clear()                                               # Windows: nothing known, nothing refused
    assert run.available_bytes("numpy") is None


def test_a_loss_picture_that_cannot_be_written_is_noted_once(tmp_path, monkeypatch, capsys):
    # the disk fills up, or a viewer holds loss.svg: training goes on, says so once, and claims no picture at the end
    train = script("train")
    calls = []

    def full_disk(path, *args, **kwargs):
        calls.append(path)
        raise TinyPalmError(f"cannot write loss picture {path}: No space left on device; {path} was not written")
    monkeypatch.setattr(train, "write_loss_svg", full_disk)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400, encoding="utf-8")
    train.main(["--data", "text.txt", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--max-steps", "6",
                "--eval-every", "2", "--eval-steps", "1", "--log-every", "2", "--sample-tokens", "0"])
    out, err = capsys.readouterr()
    assert len(calls) == 1 and err.count("note: cannot write loss picture") == 1
    assert "training goes on without it" in err and "loss curves in" not in out and "best val loss" in out
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 6


def test_the_memory_check_counts_the_threads_training_will_have(monkeypatch):
    # numpy on Accelerate or MKL: BLAS keeps the cores, the pool drops to one thread, so one gradient buffer
    from tinypalm import backend
    monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(3))
    monkeypatch.setattr(backend, "set_blas_threads", lambda n: None)
    cfg = Config.preset("palm-8b")
    one_buffer = run.training_bytes(cfg, 16, 128, "float32", gradient_buffers=1)
    monkeypatch.setattr(run, "available_bytes", lambda backend: (one_buffer + 2**20, "free"))
    run.check_memory(cfg, "numpy", 16, 128, "float32", "--preset palm-8b")      # fits with the one buffer it needs
    assert cpu_ops.pool.n_threads == 1
