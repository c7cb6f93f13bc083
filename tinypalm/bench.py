"""Time one training step (forward, backward, gradient clipping, AdamW) and show where the time goes.

    python -m tinypalm.bench                      # the reference CPU model: d_model 128, 4 layers, 4 heads,
                                                  # 1 kv head, vocab 256, batch 12 x 64, float32
    python -m tinypalm.bench --preset small --batch-size 8 --seq-len 256
    python -m tinypalm.bench --backend cupy --preset full --dtype bfloat16 --batch-size 16 --seq-len 1024
    python -m tinypalm.bench --vs-torch           # the same step in PyTorch eager, timed alternately with ours
    python -m tinypalm.bench --load 2             # without load, then beside 2 busy processes, stopped for every
                                                  # other step: the slowdown (on the CPU, taken apart by its
                                                  # threads' CPU clocks)
    python -m tinypalm.bench --vs-torch --d-model 384 --n-layers 6 --n-heads 6 --batch-size 64 --seq-len 256
                                                  # another shape: nanoGPT shakespeare_char's width, depth,
                                                  # heads and batch

The step time is the median of --steps timed steps after --warmup untimed ones. The breakdown comes from
separate steps in which every forward and backward op the model calls through model.ops is timed (the device
synchronised around each call on a GPU), so the instrumentation never slows the headline figure. MFU is PaLM's
(appendix B): the model FLOPs the step's tokens need, 6N + 12 L H Dh T per token, over the step time and the
device's peak (--peak-tflops; on cupy it defaults to an H100 SXM's dense bf16 989.4 TFLOP/s).
"""

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy

from .backend import to_numpy
from .cli import ArgumentParser, add_shape_flags, check_ranges, finite_float, run_cli, with_shape_flags
from .config import PRESETS, Config
from .errors import TinyPalmError
from .model import PaLM
from .optim import AdamW, clip_grad_norm
from .run import check_memory

H100_BF16_PEAK_TFLOPS = 989.4          # H100 SXM, dense bf16 tensor cores, without sparsity
BENCH_SHAPE = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1)
MATMUL_OPS = {"linear_forward", "linear_backward", "tied_logits_forward", "tied_logits_backward"}


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token, PaLM appendix B: 6N + 12 L H Dh T (N = all parameters)."""
    return 6 * cfg.n_params() + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def mfu(cfg, seq_len, tokens_per_s, peak_tflops):
    """Model FLOPs utilisation, PaLM appendix B: the FLOP/s the tokens need over the device's peak."""
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak_tflops * 1e12)


def make_step(model, batch_size, seq_len, seed=0):
    rng = numpy.random.default_rng(seed)
    data = rng.integers(0, model.config.vocab_size, (batch_size, seq_len + 1))
    tokens, targets = model.xp.asarray(data[:, :-1]), model.xp.asarray(data[:, 1:])
    optimizer = AdamW(model.params)

    def step():
        loss, grads = model.loss_and_grads(tokens, targets)
        clip_grad_norm(grads, 1.0)
        optimizer.step(model.params, grads, lr=1e-4)
        model.params_updated()
        return loss
    return step


def synchronize(xp):
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def time_steps(step, xp, n):
    times = []
    for _ in range(n):
        synchronize(xp)
        start = time.perf_counter()
        step()
        synchronize(xp)
        times.append(time.perf_counter() - start)
    return times


def profile_ops(step, model, n, threads=1):
    """Seconds per step inside each op function the model calls, and the step's total, from n instrumented steps.

    Each op's own time (ops call one another through ops.py directly, so nothing is counted twice). threads: how
    many threads run pieces of the batch at once (batch_threads.py); each op's time is summed over them and
    divided by it."""
    xp, ops = model.xp, model.ops
    spent = defaultdict(float)
    local = threading.local()
    originals = {name: getattr(ops, name) for name in vars(ops) if name.endswith(("_forward", "_backward"))}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if getattr(local, "depth", 0):
                return fn(*args, **kwargs)
            local.depth = 1
            synchronize(xp)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(xp)
                spent[name] += time.perf_counter() - start         # += on a float: one thread at a time (the GIL)
                local.depth = 0
        return wrapper

    for name, fn in originals.items():
        setattr(ops, name, timed(name, fn))
    try:
        total = sum(time_steps(step, xp, n))
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    return {name: t / n / threads for name, t in spent.items()}, total / n


def thread_cpu_seconds():
    """CPU seconds used so far by tinypalm's threads on the CPU (the caller's and cpu_ops' pool workers), or None
    where the platform has no per-thread clock to read (macOS, Windows).

    The share of the cores a step got, which its wall time alone cannot tell from how much work it did."""
    if not hasattr(time, "pthread_getcpuclockid"):
        return None
    from . import cpu_ops                 # imported when first used: its TINYPALM_NUM_THREADS check is a user error
    threads = [threading.current_thread(), *cpu_ops.pool.workers]
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads)


def busy_processes(n):
    """n processes that each keep one core busy (a pure-Python loop) until terminated."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


PAUSABLE = hasattr(signal, "SIGSTOP")          # not on Windows: there the load runs throughout its phase
LOAD_SETTLE_S = 0.05


def set_busy(procs, running):
    """Stop the busy processes where they are (SIGSTOP), returning once they have, or let them run on (SIGCONT),
    returning after LOAD_SETTLE_S with the cores to themselves. In that time the scheduler spreads them over the
    cores as it does a load that has run all along: woken while a step's thread held one core, both went to the
    other, and one thread then kept 0.93 of a core beside two of them, against 0.65 when they had run all along."""
    for proc in procs:
        os.kill(proc.pid, signal.SIGCONT if running else signal.SIGSTOP)
    if running:
        time.sleep(LOAD_SETTLE_S)
    else:
        for proc in procs:                  # returns on the stop; a stopped process is not reaped
            os.waitpid(proc.pid, os.WUNTRACED)


class StepTimes:
    """One program's step times under one condition; with clocks=True (tinypalm's steps, on the CPU) also the CPU
    seconds its threads spent on them."""

    def __init__(self, xp, clocks):
        self.xp, self.clocks, self.times, self.cpu = xp, clocks, [], []

    def time(self, step):
        before = thread_cpu_seconds() if self.clocks else None
        self.times += time_steps(step, self.xp, 1)
        if before is not None:
            self.cpu.append(thread_cpu_seconds() - before)

    def median(self):
        return statistics.median(self.times)

    def cores(self):
        """The cores tinypalm's threads kept busy, and their CPU seconds a step."""
        return sum(self.cpu) / sum(self.times), sum(self.cpu) / len(self.cpu)


def compare(args, cfg, model, step):
    """Median step times of tinypalm (and with --vs-torch, of the same step in PyTorch, the two alternating
    step by step so that both see the same machine), as the machine is and, with --load N, while N busy
    processes run: each program's steps then in a block of their own, in which the busy processes are stopped
    for every other step, so that the slowdown compares steps with and without load on the same machine (its
    speed moves by 10-25% from minute to minute, so a block without load and a block with it, one after the
    other, measured the machine's drift as much as the load)."""
    steps = {"tinypalm": step}
    if args.vs_torch:
        from .bench_torch import import_torch, make_torch_step
        torch = import_torch()
        weights = {name: to_numpy(a) for name, a in model.params.stored.items()}
        device = "cuda" if args.backend == "cupy" else "cpu"
        steps["torch"] = make_torch_step(cfg, args.batch_size, args.seq_len, args.dtype, weights=weights,
                                         device=device)
        peer = (f"; PyTorch {torch.__version__} eager on "
                + (f"{torch.get_num_threads()} threads" if device == "cpu" else "the same GPU")
                + ", alternating with tinypalm")
    print(f"tinypalm bench: backend {args.backend}, {args.dtype}, {cfg.n_params() / 1e6:.2f}M parameters "
          f"(d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} kv, "
          f"vocab {cfg.vocab_size}), batch {args.batch_size} x {args.seq_len}, median of {args.steps} steps"
          + (peer if args.vs_torch else ""))
    if args.vs_torch:       # both start from the same weights and tokens, so their first losses must agree
        print("first step's loss: " + ", ".join(f"{name} {float(fn()):.4f}" for name, fn in steps.items()))

    on_cpu = args.backend == "numpy" and thread_cpu_seconds() is not None

    def timed():            # {program: StepTimes}
        return {name: StepTimes(model.xp, clocks=on_cpu and name == "tinypalm") for name in steps}

    def report(label, programs):
        line = f"{label:>10s}: " + ", ".join(f"{name} median {t.median() * 1e3:.1f} ms (min {min(t.times) * 1e3:.1f})"
                                            for name, t in programs.items())
        if "torch" in programs:
            line += (f"; tinypalm / torch: median {programs['tinypalm'].median() / programs['torch'].median():.2f}, "
                     f"min {min(programs['tinypalm'].times) / min(programs['torch'].times):.2f}")
        if programs["tinypalm"].cpu:
            cores, cpu = programs["tinypalm"].cores()
            line += f"; tinypalm's threads on {cores:.2f} cores, {cpu * 1e3:.1f} ms CPU a step"
        print(line)

    idle = timed()
    for fn in steps.values():
        time_steps(fn, model.xp, args.warmup)
    for _ in range(args.steps):
        for name, fn in steps.items():
            idle[name].time(fn)
    report("no load", idle)
    if not args.load:
        return

    loaded = timed()
    between = timed() if PAUSABLE else idle        # the steps without load, taking turns with those with it
    busy = busy_processes(args.load)
    try:
        # each program's steps in a block of their own: alternating under load, PyTorch's OpenMP workers (they
        # spin for a while after each parallel region) took time from tinypalm's next step, 10-20% of it
        for name, fn in steps.items():
            time_steps(fn, model.xp, args.warmup)
            for _ in range(args.steps):
                if PAUSABLE:
                    set_busy(busy, running=False)
                    between[name].time(fn)
                    set_busy(busy, running=True)
                loaded[name].time(fn)
    finally:
        if PAUSABLE:
            set_busy(busy, running=True)       # a stopped process acts on SIGTERM only once it runs again
        for proc in busy:
            proc.terminate()
            proc.wait()
    report(f"{args.load} busy", loaded)
    print("  with load / without (medians" + ("; each program's steps taking turns, the busy processes stopped for "
                                              "every other one): " if PAUSABLE else
                                              "; the load running throughout, the steps without it from above): ")
          + ", ".join(f"{name} {loaded[name].median() * 1e3:.1f} / {between[name].median() * 1e3:.1f} ms = "
                      f"{loaded[name].median() / between[name].median():.2f}x" for name in steps))
    if on_cpu:
        # the slowdown, taken apart: the share of the cores the step got, and the work it did there. Beside N
        # busy processes on C cores, T threads that never wait get T x min(1, C / (T + N)) cores
        (idle_cores, idle_cpu), (loaded_cores, loaded_cpu) = between["tinypalm"].cores(), loaded["tinypalm"].cores()
        from . import cpu_ops
        threads, cores = cpu_ops.pool.n_threads, cpu_ops.default_cores()
        fair = threads * min(1.0, cores / (threads + args.load))
        print(f"  tinypalm's threads, by their CPU clocks: on {idle_cores:.2f} cores without load, {loaded_cores:.2f} "
              f"with it (a fair share for {threads} thread{'s' * (threads != 1)} beside {args.load} busy "
              f"process{'es' * (args.load != 1)} on {cores} cores: "
              f"{fair:.2f}); {loaded_cpu / idle_cpu:.2f}x the CPU time a step with load")


def build_parser():
    p = ArgumentParser(prog="python -m tinypalm.bench", description=__doc__)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--preset", default=None,
                   help=f"time a Config preset ({', '.join(PRESETS)}) instead (default: the reference CPU benchmark shape)")
    add_shape_flags(p, ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"),
                    "the preset's or the reference shape's")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"],
                   help="float32, float64 or bfloat16 (mixed precision)")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=30, help="timed steps (the figure is their median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--vs-torch", action="store_true", help="also time the same step in PyTorch eager (needs torch)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="time steps without load and beside N busy-looping processes in turn (N = cores: a busy "
                        "machine), and print the slowdown (0: no load)")
    p.add_argument("--peak-tflops", type=finite_float, default=None,
                   help=f"the device's peak for MFU (default on cupy: {H100_BF16_PEAK_TFLOPS}, an H100's dense bf16)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_ranges(args, at_least_1=["batch_size", "seq_len", "steps"], not_negative=["warmup"])
    if args.load < 0:
        raise TinyPalmError(f"--load {args.load}: give the number of busy processes to run, 0 or more")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise TinyPalmError(f"--peak-tflops {args.peak_tflops}: give the device's peak in TFLOP/s, above 0")

    shape = with_shape_flags(Config.preset(args.preset).to_dict() if args.preset else BENCH_SHAPE, args)
    shape["max_seq_len"] = max(shape.get("max_seq_len", 0), args.seq_len)
    cfg = Config(**shape)
    check_memory(cfg, args.backend, args.batch_size, args.seq_len, args.dtype,
                 f"--preset {args.preset}" if args.preset else "the benchmark model")
    model = PaLM(cfg, backend=args.backend, dtype=args.dtype, seed=0)
    step = make_step(model, args.batch_size, args.seq_len)
    xp = model.xp
    if args.vs_torch or args.load:
        return compare(args, cfg, model, step)

    time_steps(step, xp, args.warmup)
    times = time_steps(step, xp, args.steps)
    median = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    print(f"tinypalm bench: backend {args.backend}, dtype {args.dtype}, {cfg.n_params() / 1e6:.2f}M parameters "
          f"(d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} kv, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}), batch {args.batch_size} x {args.seq_len}")
    print(f"step: median {median * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
          f"over {args.steps} steps; {tokens / median:,.0f} tokens/s; "
          f"{flops_per_token(cfg, args.seq_len) * tokens / median / 1e9:.1f} GFLOP/s (6N + 12LHDhT)")
    peak = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if args.backend == "cupy" else None)
    if peak:
        print(f"MFU {mfu(cfg, args.seq_len, tokens / median, peak):.1%} of {peak:g} TFLOP/s "
              "(PaLM appendix B: tokens/s x (6N + 12LHDhT) / peak)")
    if xp is not numpy:
        print(f"peak GPU memory (pool): {xp.get_default_memory_pool().total_bytes() / 2**30:.2f} GiB")

    threads = len(model.split_batch.pieces(args.batch_size)) if model.split_batch is not None else 1
    per_op, total = profile_ops(step, model, max(3, args.steps // 3), threads)
    matmul = sum(t for name, t in per_op.items() if name in MATMUL_OPS)
    attention = sum(t for name, t in per_op.items() if name.startswith("attention"))
    print(f"where the time goes (instrumented step: {total * 1e3:.1f} ms"
          + (f"; the batch ran as {threads} pieces on {threads} threads at once, each op's time is their sum / "
             f"{threads}" if threads > 1 else "") + "):")
    print(f"  matmuls (linear, tied logits) {matmul / total:6.1%}   attention {attention / total:6.1%}   "
          f"other ops {(sum(per_op.values()) - matmul - attention) / total:6.1%}   "
          f"outside ops (AdamW, clipping, glue) {(total - sum(per_op.values())) / total:6.1%}")
    for name, t in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {t * 1e3:7.2f} ms  {t / total:6.1%}")


if __name__ == "__main__":
    run_cli(main)
