"""Time one training step (forward, backward, gradient clipping, AdamW) and show where the time goes.

    python -m tinypalm.bench                      # the reference CPU model: d_model 128, 4 layers, 4 heads,
                                                  # 1 kv head, vocab 256, batch 12 x 64, float32
    python -m tinypalm.bench --preset small --batch-size 8 --seq-len 256
    mpiexec -n 2 python -m tinypalm.bench         # data parallel: each rank a batch, gradients averaged over MPI
    python -m tinypalm.bench --preset full --ranks 8 --bandwidth 300 --comm-only   # what 8 ranks would move

The step time is the median of --steps timed steps after --warmup untimed ones. The breakdown comes from
separate steps in which every function of tinypalm.ops is timed (the device synchronised around each call on
a GPU), so the instrumentation never slows the headline figure.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict

import numpy

from . import dist
from .config import Config
from .model import PaLM
from .optim import AdamW

BENCH_SHAPE = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1)
MATMUL_OPS = {"linear_forward", "linear_backward", "tied_logits_forward", "tied_logits_backward"}


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token, PaLM appendix B: 6N + 12 L H Dh T (N = all parameters)."""
    return 6 * cfg.n_params() + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def make_step(model, batch_size, seq_len, seed=0, comm=dist.Single(), zero=0):
    rng = numpy.random.default_rng(seed + comm.rank)
    data = rng.integers(0, model.config.vocab_size, (batch_size, seq_len + 1))
    tokens, targets = model.xp.asarray(data[:, :-1]), model.xp.asarray(data[:, 1:])
    comm.attach(model, zero=zero)
    optimizer = AdamW(model.params, shard=comm.shard)

    def step():
        loss, grads = model.loss_and_grads(tokens, targets)
        comm.average_gradients(grads, comm.size)
        comm.clip_grad_norm(grads, 1.0)
        comm.update(optimizer, model.params, grads, lr=1e-4)
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


def profile_ops(step, model, n):
    """Seconds per step inside each op function the model calls, and the step's total, from n instrumented steps.

    Only outermost calls count (softmax runs inside attention and is counted there)."""
    xp, ops = model.xp, model.ops
    spent = defaultdict(float)
    depth = [0]
    originals = {name: getattr(ops, name) for name in vars(ops) if name.endswith(("_forward", "_backward"))}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            synchronize(xp)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(xp)
                spent[name] += time.perf_counter() - start
                depth[0] -= 1
        return wrapper

    for name, fn in originals.items():
        setattr(ops, name, timed(name, fn))
    try:
        total = sum(time_steps(step, xp, n))
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    return {name: t / n for name, t in spent.items()}, total / n


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    comm = dist.init(argv)                      # under mpiexec: one rank of a data-parallel step; rank 0 prints
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--preset", default=None, help="a Config preset (default: the reference CPU benchmark shape)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ranks", type=int, default=None, help="print what data parallelism on this many ranks moves "
                   "and stores (default: the ranks of this mpiexec run)")
    p.add_argument("--bandwidth", type=float, default=100.0, help="bus bandwidth per rank in GB/s, for --ranks")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1], help="under mpiexec: split the AdamW state (ZeRO-1)")
    p.add_argument("--comm-only", action="store_true", help="print the --ranks figures only, time nothing")
    args = p.parse_args(argv)

    shape = Config.preset(args.preset).to_dict() if args.preset else dict(BENCH_SHAPE)
    shape["max_seq_len"] = max(shape.get("max_seq_len", 0), args.seq_len)
    cfg = Config(**shape)
    if args.ranks or comm.size > 1:
        print("\n".join(dist.plan_report(cfg, args.ranks or comm.size, args.dtype, args.bandwidth)))
    if args.comm_only:
        return
    comm.use_device(args.backend)
    model = PaLM(cfg, backend=args.backend, dtype=args.dtype, seed=0)
    step = make_step(model, args.batch_size, args.seq_len, comm=comm, zero=args.zero)
    xp = model.xp

    time_steps(step, xp, args.warmup)
    times = time_steps(step, xp, args.steps)
    median = statistics.median(times)
    tokens = args.batch_size * args.seq_len * comm.size
    print(f"tinypalm bench: backend {args.backend}, dtype {args.dtype}, {cfg.n_params() / 1e6:.2f}M parameters "
          f"(d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} kv, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}), batch {args.batch_size} x {args.seq_len}"
          + (f" on each of {comm.size} ranks" if comm.size > 1 else ""))
    print(f"step: median {median * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
          f"over {args.steps} steps; {tokens / median:,.0f} tokens/s; "
          f"{flops_per_token(cfg, args.seq_len) * tokens / median / 1e9:.1f} GFLOP/s (6N + 12LHDhT)")
    if xp is not numpy:
        print(f"peak GPU memory (pool): {xp.get_default_memory_pool().total_bytes() / 2**30:.2f} GiB")
    if comm.size > 1:                           # the gradient collective alone, on a buffer of the step's size
        grads = model.grads_like()
        alone = statistics.median(time_steps(lambda: comm.average_gradients(grads, comm.size), xp, args.steps))
        moved = (1 if comm.shard else 2) * (comm.size - 1) / comm.size * grads.flat.nbytes   # per rank, each way
        print(f"gradient {'reduce-scatter' if comm.shard else 'all-reduce'} alone: median {alone * 1e3:.2f} ms "
              f"({alone / median:.1%} of the step), {moved / alone / 1e9:.2f} GB/s bus bandwidth")

    per_op, total = profile_ops(step, model, max(3, args.steps // 3))
    matmul = sum(t for name, t in per_op.items() if name in MATMUL_OPS)
    attention = sum(t for name, t in per_op.items() if name.startswith("attention"))
    print(f"where the time goes (instrumented step: {total * 1e3:.1f} ms):")
    print(f"  matmuls (linear, tied logits) {matmul / total:6.1%}   attention {attention / total:6.1%}   "
          f"other ops {(sum(per_op.values()) - matmul - attention) / total:6.1%}   "
          f"outside ops (AdamW, clipping, glue) {(total - sum(per_op.values())) / total:6.1%}")
    for name, t in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {t * 1e3:7.2f} ms  {t / total:6.1%}")


if __name__ == "__main__":
    main()
