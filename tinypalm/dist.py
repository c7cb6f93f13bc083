"""Data-parallel training over several processes: MPI starts and coordinates them, NCCL moves gradients on GPUs.

    mpiexec -n 4 python train.py ...                          # 4 CPU processes
    mpiexec -n 8 python train.py --backend cupy ...           # 8 GPUs, one per process
    mpiexec -n 8 python train.py --backend cupy --zero 1 ...  # optimizer state split over the 8

Every rank holds the whole model and runs its own micro-batches of the step. The gradients are then summed
over the ranks with a few large all-reduces, each over a bucket (a stretch of the flat gradient vector, see
flat.py), and every rank applies the same AdamW update. With ZeRO-1 the AdamW moments are split instead: the
gradient is reduce-scattered so that each rank holds the sum of its own shard (a stretch of the flat vector),
updates the weights of that shard with the moments of that shard alone, and the weights are all-gathered.

On GPUs the all-reduce of each bucket starts on a side stream as soon as the step's last micro-batch's backward
has finished the layers it holds, so communication overlaps the rest of the backward (not with --zero 1, nor
for LoRA's adapters: those go after the backward).

With LoRA (train.py --lora-rank) only the adapters train: their small flat vector is all-reduced in one bucket
after the backward, and ZeRO-1 splits their moments.

`init(argv)` gives a process its communicator: `Single`, whose collectives do nothing, unless mpiexec started
several processes. A single process never imports mpi4py or NCCL.
"""

import json
import os
import shlex
import sys
import time
import traceback
import zlib

import numpy as np

from .backend import address, get_xp, to_numpy
from .errors import TinyPalmError
from .model import layer_storage_names
from .optim import AdamW, Stretch, clip_grad_norm

# Launchers announce the number of processes in the environment before MPI starts:
# MPICH's and Intel MPI's hydra and Slurm's PMI-2 (PMI_SIZE), Open MPI (OMPI_COMM_WORLD_SIZE), MVAPICH.
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
BUCKET_BYTES = 32 << 20     # gradient bytes per all-reduce: large enough for full bandwidth, small enough to overlap
GRACE_S = 3.0               # a failing rank other than 0 waits this long for rank 0 to report the same error

_world = None               # this process's communicator, once init() made it (read by ends_together)


def launched_size(environ=os.environ):
    """How many processes the launcher started (1 when not started by mpiexec)."""
    for var in SIZE_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


def init(argv):
    """This process's communicator. Under mpiexec: MPI starts, ranks other than 0 fall silent, and every rank
    checks that it was given rank 0's arguments."""
    global _world
    if launched_size() <= 1:
        _world = Single()
        return _world
    if not next((os.environ[v] == "0" for v in RANK_VARS if v in os.environ), True):
        silence_output()
    try:
        from mpi4py import MPI
    except ImportError:
        raise TinyPalmError(f"started by mpiexec as {launched_size()} processes, but mpi4py is not installed; "
                            "install it with `pip install -e '.[mpi]'`") from None
    _world = MPIComm(MPI)
    if _world.size != launched_size():
        raise TinyPalmError(f"the launcher started {launched_size()} processes but MPI counts {_world.size}: this mpiexec "
                            "belongs to another MPI than mpi4py's; use the mpiexec installed beside it "
                            f"({os.path.join(os.path.dirname(sys.executable), 'mpiexec')} after `pip install -e '.[mpi]'`)")
    _world.check_arguments(argv)
    return _world


def silence_output():
    """Rank 0 alone speaks: the others' stdout and stderr go nowhere (their errors are written by fail())."""
    sys.stdout = sys.stderr = open(os.devnull, "w")


def ends_together(main):
    """main, such that an error on any one of several ranks ends every rank: one line, then MPI_Abort.

    An error every rank meets (a bad flag, a diverged step) is reported by rank 0 alone; one that a single rank
    meets (a crash, a full disk) is reported by that rank, with its number. Without this, the other ranks would
    wait forever in their next collective."""
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit:          # --help, argparse's usage errors: the same on every rank, which all exit
            raise
        except BaseException as error:
            if _world is None or _world.size == 1:
                raise
            _world.fail(error)
    return run


def plan_buckets(layout, n_layers, bucket_bytes, itemsize):
    """[(start, stop, ready_after)]: buckets of the flat gradient vector, in the order the backward finishes them.

    The flat order is embed, layers 0 .. n-1, norm. The backward finishes the final norm first, then layer n-1
    down to layer 0, and the embedding last (it also receives the tied logits' gradient at the very start). A
    bucket runs from some layer's first element to the previous bucket's start, closed once it holds
    bucket_bytes; `ready_after` is the layer whose backward completes it, None for the last bucket, which holds
    the embedding and is complete only when the backward returns."""
    buckets, stop = [], layout.size
    for i in reversed(range(n_layers)):
        start = min(layout.spans[name][0] for name in layer_storage_names(i))
        if (stop - start) * itemsize >= bucket_bytes:
            buckets.append((start, stop, i))
            stop = start
    buckets.append((0, stop, None))
    return buckets


def shard_bounds(size, n_ranks):
    """[(start, stop)] per rank: the flat vector cut into n_ranks stretches of nearly equal length."""
    return [(r * size // n_ranks, (r + 1) * size // n_ranks) for r in range(n_ranks)]


def fingerprint(*items):
    """One CRC-32 per item (an array, or anything JSON can write): numbers that differ when two ranks read different
    data, e.g. a file that is not the same on every machine."""
    return tuple(zlib.crc32(np.ascontiguousarray(to_numpy(item)).tobytes() if hasattr(item, "shape")
                            else json.dumps(item, sort_keys=True).encode()) for item in items)


class Single:
    """The communicator of a process that trains alone: every collective is the identity."""

    rank, size, local_rank, local_size, is_root = 0, 1, 0, 1, True
    shard = None

    def check_same(self, what, value):
        pass

    def from_root(self, value):
        return value

    def use_device(self, backend):
        pass

    def attach(self, model, trained, zero=0, micro_batches=1):
        pass

    def sum(self, x):
        return x

    def any(self, flag):
        return bool(flag)

    def average_gradients(self, grads, micro_batches):
        if micro_batches > 1:
            grads.flat *= 1.0 / micro_batches

    def clip_grad_norm(self, grads, max_norm):
        return clip_grad_norm(grads, max_norm)

    def update(self, optimizer, params, grads, lr):
        optimizer.step(params, grads, lr)

    def whole_optimizer(self, optimizer):
        return optimizer

    def load_optimizer(self, optimizer, state, xp):
        optimizer.load_state_dict(state, xp)


class MPIComm:
    """One rank of an mpiexec run. Scalars and arguments go over MPI; gradients over MPI (numpy) or NCCL (cupy)."""

    def __init__(self, MPI):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        machine = self.comm.Split_type(MPI.COMM_TYPE_SHARED)        # the ranks on this rank's machine
        self.local_rank, self.local_size = machine.Get_rank(), machine.Get_size()
        if "TINYPALM_NUM_THREADS" not in os.environ:   # the machine's cores shared out among its ranks
            from . import cpu_ops
            cpu_ops.pool.n_threads = max(1, cpu_ops.pool.n_threads // machine.Get_size())
        self.shard, self.reducer = None, None
        if not self.is_root:
            silence_output()

    def check_arguments(self, argv):
        """Every rank must run rank 0's command: a rank started with other arguments ends the run."""
        argvs = self.comm.allgather(list(argv))
        other = next((r for r, a in enumerate(argvs) if a != argvs[0]), None)
        if other is not None:
            raise TinyPalmError(f"the {self.size} ranks were started with different arguments (rank 0: "
                                f"{shlex.join(argvs[0]) or '(none)'}; rank {other}: {shlex.join(argvs[other]) or '(none)'}); "
                                "start every rank with the same command")

    def check_same(self, what, value):
        """Every rank must hold rank 0's value (its data, its checkpoint): one that does not ends the run."""
        values = self.comm.allgather(value)
        other = next((r for r, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            raise TinyPalmError(f"{what} differs between rank 0 and rank {other} ({values[0]} against {values[other]}); "
                                "every rank must read the same files: put them where every machine sees them")

    def from_root(self, value):
        """Rank 0's value on every rank (a figure that decides what all ranks do next)."""
        return self.comm.bcast(value, root=0)

    def fail(self, error):
        """End every rank: one line on stderr, from rank 0 if it meets the error too, then MPI_Abort."""
        if isinstance(error, TinyPalmError):
            line, status = str(error), 2
        elif isinstance(error, KeyboardInterrupt):
            line, status = "interrupted", 130
        else:
            where = traceback.extract_tb(error.__traceback__)[-1]
            line, status = f"{type(error).__name__}: {error} (at {os.path.basename(where.filename)}:{where.lineno})", 1
        if not self.is_root:
            time.sleep(GRACE_S)          # if rank 0 meets it too, its abort ends this rank first
            line = f"rank {self.rank}: {line}"
        sys.__stderr__.write(f"error: {line}\n")
        sys.__stderr__.flush()
        time.sleep(0.5)                  # for mpiexec to pass the line on before the abort tears everything down
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)     # MPI_Abort's own report would add lines
        self.comm.Abort(status)

    # --- scalars: the same result on every rank ---------------------------------------------------------------

    def sum(self, x):
        total = np.array(float(x))
        self.comm.Allreduce(self.MPI.IN_PLACE, total, op=self.MPI.SUM)
        return float(total)

    def any(self, flag):
        return self.comm.allreduce(bool(flag), op=self.MPI.LOR)

    # --- gradients and the update ----------------------------------------------------------------------------

    def use_device(self, backend):
        """With cupy, one GPU per rank, picked by the rank within its machine; NCCL binds to it."""
        if backend != "cupy":
            return
        cupy = get_xp("cupy")
        n_gpus = cupy.cuda.runtime.getDeviceCount()
        if self.local_rank >= n_gpus:
            raise TinyPalmError(f"rank {self.rank} is process {self.local_rank + 1} on its machine, which has "
                                f"{n_gpus} GPU(s); start at most one rank per GPU")
        cupy.cuda.Device(self.local_rank).use()

    def attach(self, model, trained, zero=0, micro_batches=1):
        """Plan the buckets and shards of the parameters that train: model.params, or LoRA's adapters (one bucket,
        all-reduced once the backward is done: they are small); micro_batches is this rank's count per step."""
        layout = trained.layout
        self.params, self.xp = trained, model.xp
        self.shards = shard_bounds(layout.size, self.size)
        self.shard = self.shards[self.rank] if zero else None
        whole_model = trained is model.params
        buckets = (plan_buckets(layout, model.config.n_layers, BUCKET_BYTES, trained.flat.itemsize) if whole_model
                   else [(0, layout.size, None)])
        if model.backend == "cupy":
            self.reducer = NCCLReducer(self.comm, model, buckets, self.shards, micro_batches,
                                       overlap=whole_model and not zero)
        else:
            self.reducer = MPIReducer(self.MPI, self.comm, buckets, self.shards)

    def average_gradients(self, grads, micro_batches):
        """The mean over the global batch's micro_batches (all ranks'): on every rank, or on its shard (ZeRO-1)."""
        if self.shard is None:
            self.reducer.all_reduce(grads.flat)
            mine = grads.flat
        else:
            self.reducer.reduce_scatter(grads.flat, self.rank)
            mine = grads.flat[self.shard[0]:self.shard[1]]
        mine *= 1.0 / micro_batches

    def clip_grad_norm(self, grads, max_norm):
        if self.shard is None:                   # every rank holds the whole averaged gradient
            return clip_grad_norm(grads, max_norm)
        g = grads.flat[self.shard[0]:self.shard[1]]
        total = self.sum(float(g @ g)) ** 0.5    # the shards' squared norms add up to the whole one's
        if max_norm and total > max_norm:
            g *= max_norm / (total + 1e-6)
        return total

    def update(self, optimizer, params, grads, lr):
        if self.shard is None:
            return optimizer.step(params, grads, lr)
        a, b = self.shard
        optimizer.step(Stretch(params.flat[a:b]), Stretch(grads.flat[a:b]), lr)
        self.reducer.all_gather(params.flat, self.rank)

    # --- the optimizer state in checkpoints: always the whole of it -------------------------------------------

    def whole_optimizer(self, optimizer):
        """An AdamW holding the whole state, on rank 0 (None elsewhere): the shards gathered under ZeRO-1."""
        if self.shard is None:
            return optimizer
        whole = [self._gather(moments.flat) for moments in (optimizer.m, optimizer.v)]
        if not self.is_root:
            return None
        full = self._full_like(optimizer)
        full.t = optimizer.t
        for moments, gathered in zip((full.m, full.v), whole):
            moments.flat[...] = self.xp.asarray(gathered)
        return full

    def load_optimizer(self, optimizer, state, xp):
        """Load a whole saved state (from any number of ranks): under ZeRO-1, keep this rank's shard of it."""
        if self.shard is None:
            return optimizer.load_state_dict(state, xp)
        full = self._full_like(optimizer)
        full.load_state_dict(state, xp)
        a, b = self.shard
        optimizer.t = full.t
        optimizer.m.flat[...], optimizer.v.flat[...] = full.m.flat[a:b], full.v.flat[a:b]

    def _full_like(self, optimizer):
        return AdamW(self.params, (optimizer.beta1, optimizer.beta2), optimizer.eps, optimizer.weight_decay,
                     optimizer.frozen)

    def _gather(self, part):
        """The shards of a flat vector, concatenated on rank 0 (host memory)."""
        part = np.ascontiguousarray(to_numpy(part))
        counts = [b - a for a, b in self.shards]
        whole = np.empty(sum(counts), part.dtype) if self.is_root else None
        self.comm.Gatherv(part, [whole, counts] if self.is_root else None, root=0)
        return whole


class MPIReducer:
    """Gradient collectives on host arrays (numpy) over MPI, one call per bucket."""

    def __init__(self, MPI, comm, buckets, shards):
        self.MPI, self.comm, self.buckets, self.shards = MPI, comm, buckets, shards

    def all_reduce(self, flat):
        for a, b, _ in self.buckets:
            self.comm.Allreduce(self.MPI.IN_PLACE, flat[a:b], op=self.MPI.SUM)

    def reduce_scatter(self, flat, rank):
        a, b = self.shards[rank]
        mine = np.empty(b - a, flat.dtype)
        self.comm.Reduce_scatter(flat, mine, recvcounts=[stop - start for start, stop in self.shards], op=self.MPI.SUM)
        flat[a:b] = mine

    def all_gather(self, flat, rank):
        counts = [b - a for a, b in self.shards]
        displacements = [a for a, _ in self.shards]
        self.comm.Allgatherv(self.MPI.IN_PLACE, [flat, (counts, displacements)])


def nccl_communicator(comm, nccl):
    """NCCL's communicator over the MPI ranks: rank 0 makes NCCL's unique id, MPI broadcasts it, every rank joins.

    Each rank must have picked its GPU first (MPIComm.use_device): the communicator binds to the current device."""
    uid = nccl.get_unique_id() if comm.Get_rank() == 0 else None
    uid = comm.bcast(uid, root=0)
    return nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())


class NCCLReducer:
    """Gradient collectives on GPU arrays (cupy) over NCCL.

    With overlap, the model's loss_and_grads and per-layer backward are wrapped: during the last micro-batch of a
    step, each bucket's all-reduce is queued on a side stream (after an event on the compute stream) as soon as
    the layers it holds are done, and all_reduce() queues the rest and makes the compute stream wait for them.
    ZeRO-1's reduce-scatter and all-gather run after the backward, on the compute stream."""

    def __init__(self, mpi_comm, model, buckets, shards, micro_batches, overlap=True, cupy=None, nccl=None):
        if cupy is None:                   # (the tests pass stand-ins for both)
            import cupy
            from cupy.cuda import nccl
        self.cupy, self.nccl = cupy, nccl
        self.comm = nccl_communicator(mpi_comm, nccl)
        self.nccl_dtype = {np.dtype("float32"): nccl.NCCL_FLOAT32, np.dtype("float64"): nccl.NCCL_FLOAT64}[
            np.dtype(model.master_dtype)]                                   # the gradients' dtype
        self.buckets, self.shards, self.micro_batches = buckets, shards, micro_batches
        self.side = cupy.cuda.Stream(non_blocking=True)
        self.flat, self.micro, self.launched = None, 0, 0
        if overlap:
            self._watch(model)

    def _watch(self, model):
        loss_and_grads, block_backward = model.loss_and_grads, model._block_backward
        layer_index = {id(layer): i for i, layer in enumerate(model.layers)}

        def watched_loss_and_grads(tokens, targets, *args, grads=None, **kwargs):
            grads = model.grads_like() if grads is None else grads
            self.micro += 1
            self.flat = grads.flat if self.micro == self.micro_batches else None    # the step's last micro-batch
            return loss_and_grads(tokens, targets, *args, grads=grads, **kwargs)

        def watched_block_backward(dx, layer, *args, **kwargs):
            dx = block_backward(dx, layer, *args, **kwargs)
            if self.flat is not None:
                self._launch_ready(layer_index[id(layer)])
            return dx

        model.loss_and_grads, model._block_backward = watched_loss_and_grads, watched_block_backward

    def _launch_ready(self, finished_layer):
        """Queue the all-reduce of every bucket whose layers are all done (ready_after >= the layer just done)."""
        while self.launched < len(self.buckets):
            a, b, ready_after = self.buckets[self.launched]
            if ready_after is None or ready_after < finished_layer:
                return
            self._all_reduce_on_side(a, b)
            self.launched += 1

    def _all_reduce_on_side(self, a, b):
        self.side.wait_event(self.cupy.cuda.get_current_stream().record())     # after the backward wrote it
        bucket = address(self.flat[a:b])
        self.comm.allReduce(bucket, bucket, b - a, self.nccl_dtype, self.nccl.NCCL_SUM, self.side.ptr)

    def all_reduce(self, flat):
        if self.flat is None:              # not overlapped (no watch, or an unexpected call order): all of it now
            self.flat, self.launched = flat, 0
        for a, b, _ in self.buckets[self.launched:]:
            self._all_reduce_on_side(a, b)
        self.cupy.cuda.get_current_stream().wait_event(self.side.record())
        self.flat, self.micro, self.launched = None, 0, 0

    def reduce_scatter(self, flat, rank):
        """Shards of uneven length: one reduce to each shard's owner, grouped into one NCCL operation."""
        stream = self.cupy.cuda.get_current_stream().ptr
        self.nccl.groupStart()
        for owner, (a, b) in enumerate(self.shards):
            part = address(flat[a:b])
            self.comm.reduce(part, part, b - a, self.nccl_dtype, self.nccl.NCCL_SUM, owner, stream)
        self.nccl.groupEnd()
        self.micro = 0

    def all_gather(self, flat, rank):
        """Each owner broadcasts its updated shard, grouped into one NCCL operation."""
        stream = self.cupy.cuda.get_current_stream().ptr
        self.nccl.groupStart()
        for owner, (a, b) in enumerate(self.shards):
            part = address(flat[a:b])
            self.comm.broadcast(part, part, b - a, self.nccl_dtype, owner, stream)
        self.nccl.groupEnd()


# --- what data parallelism costs, before running it -------------------------------------------------------------

BYTES = {"float64": (8, 8), "float32": (4, 4), "bfloat16": (4 + 2, 4)}   # (weights, gradients) per parameter:
# bfloat16 keeps float32 master weights beside the bf16 copy the model computes with, and float32 gradients


def plan_report(cfg, ranks, dtype="float32", bandwidth_gbs=100.0, bucket_bytes=BUCKET_BYTES):
    """Lines describing one data-parallel step of this model on `ranks` ranks: the gradient bytes all-reduced,
    the time that takes at a given bus bandwidth, and the memory per rank with and without ZeRO-1."""
    from .flat import Layout
    from .model import storage_shapes
    layout = Layout(storage_shapes(cfg))
    weight_bytes, grad_bytes = BYTES[dtype]
    n = layout.size
    buckets = plan_buckets(layout, cfg.n_layers, bucket_bytes, grad_bytes)
    grads = n * grad_bytes
    moved = 2 * (ranks - 1) / ranks * grads              # what each rank sends (and receives) in a ring all-reduce
    seconds = moved / (bandwidth_gbs * 1e9)
    adam = 2 * n * 4 if dtype != "float64" else 2 * n * 8
    mb = lambda x: f"{x / 1e6:,.1f} MB" if x < 1e10 else f"{x / 1e9:,.1f} GB"  # noqa: E731
    rows = [("without ZeRO", adam), ("ZeRO-1", adam / ranks)]
    lines = [f"data parallel: {n / 1e6:,.1f}M parameters on {ranks} ranks, {dtype} training",
             f"  all-reduced per step: {mb(grads)} of gradients, in {len(buckets)} bucket(s) (each closed at "
             f"{bucket_bytes >> 20} MiB or more, cut between layers; the last may be smaller); a ring all-reduce "
             f"sends and receives {mb(moved)} per rank (2(N-1)/N of it)",
             f"  at {bandwidth_gbs:g} GB/s bus bandwidth per rank: {seconds * 1e3:,.2f} ms per step "
             "(ZeRO-1's reduce-scatter plus all-gather move the same bytes)",
             "  memory per rank      weights      gradients    AdamW m, v   total (activations not included)"]
    for name, optimizer in rows:
        lines.append(f"    {name:16s} {mb(n * weight_bytes):>12s} {mb(grads):>12s} {mb(optimizer):>12s}   "
                     f"{mb(n * weight_bytes + grads + optimizer)}")
    return lines


# --- python -m tinypalm.dist: the plan, and a timed data-parallel step under mpiexec ------------------------------

def main(argv=None):
    """Print what data parallelism moves and stores for a model; under mpiexec with --time, time its step."""
    import statistics

    from .bench import BENCH_SHAPE, time_steps
    from .cli import ArgumentParser, check_ranges, finite_float
    from .config import Config
    from .run import check_memory
    from .model import PaLM

    argv = sys.argv[1:] if argv is None else argv
    comm = init(argv)
    p = ArgumentParser(prog="python -m tinypalm.dist", description=main.__doc__)
    p.add_argument("--preset", default=None, help="a Config preset (default: the CPU benchmark shape of tinypalm.bench)")
    p.add_argument("--ranks", type=int, default=None, help="ranks to plan for (default: this run's)")
    p.add_argument("--bandwidth", type=finite_float, default=100.0, help="bus bandwidth per rank in GB/s (default 100)")
    p.add_argument("--dtype", default="float32", choices=list(BYTES))
    p.add_argument("--time", action="store_true", help="time the data-parallel step (start it with mpiexec)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--batch-size", type=int, default=12, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    check_ranges(args, at_least_1=["ranks", "batch_size", "seq_len", "steps"], not_negative=["warmup"])
    if args.bandwidth <= 0:
        raise TinyPalmError(f"--bandwidth {args.bandwidth}: give the bus bandwidth per rank in GB/s, above 0")
    shape = Config.preset(args.preset).to_dict() if args.preset else dict(BENCH_SHAPE)
    shape["max_seq_len"] = max(shape.get("max_seq_len", 0), args.seq_len)
    cfg = Config(**shape)
    print("\n".join(plan_report(cfg, args.ranks or comm.size, args.dtype, args.bandwidth)))
    if not args.time:
        return
    if args.ranks not in (None, comm.size):
        print(f"note: the plan is for --ranks {args.ranks}; the step is timed on the {comm.size} rank(s) this run has "
              f"(start it with mpiexec -n {args.ranks} to time those)")
    check_memory(cfg, args.backend, args.batch_size, args.seq_len, args.dtype,
                 f"--preset {args.preset}" if args.preset else "the bench's model", ranks_here=comm.local_size)
    comm.use_device(args.backend)
    model = PaLM(cfg, backend=args.backend, dtype=args.dtype, seed=0)
    comm.attach(model, model.params, zero=args.zero)
    optimizer = AdamW(model.params, shard=comm.shard)
    rng = np.random.default_rng(comm.rank)                     # each rank its own batch
    batch = model.xp.asarray(rng.integers(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1)))

    def step():
        _, grads = model.loss_and_grads(batch[:, :-1], batch[:, 1:])
        comm.average_gradients(grads, comm.size)
        comm.clip_grad_norm(grads, 1.0)
        comm.update(optimizer, model.params, grads, lr=1e-4)

    time_steps(step, model.xp, args.warmup)
    median = statistics.median(time_steps(step, model.xp, args.steps))
    tokens = comm.size * args.batch_size * args.seq_len
    print(f"timed: {comm.size} rank(s) x batch {args.batch_size} x {args.seq_len}, {args.backend} {args.dtype}"
          f"{', ZeRO-1' if comm.shard else ''}: step median {median * 1e3:.1f} ms over {args.steps} steps, "
          f"{tokens / median:,.0f} tokens/s in all")
    if comm.size > 1:                           # the gradient collective alone, on a buffer of the step's size
        grads = model.grads_like()
        alone = statistics.median(time_steps(lambda: comm.average_gradients(grads, comm.size), model.xp, args.steps))
        moved = (1 if comm.shard else 2) * (comm.size - 1) / comm.size * grads.flat.nbytes   # per rank, each way
        print(f"gradient {'reduce-scatter' if comm.shard else 'all-reduce'} alone: median {alone * 1e3:.2f} ms "
              f"({alone / median:.1%} of the step), {moved / alone / 1e9:.2f} GB/s bus bandwidth")


if __name__ == "__main__":
    from .cli import run_cli
    run_cli(ends_together(main))
