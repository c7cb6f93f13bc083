"""The housekeeping of a training run, kept out of train.py's loop: the output directory, Ctrl-C, when to save,
the time-left estimate, and whether the model fits in memory at all."""

import os
import signal
import sys
import time

try:
    import fcntl
except ImportError:                 # Windows: --out is not locked
    fcntl = None

from . import checkpoint
from .backend import check_dtype, compute_dtype
from .errors import TinyPalmError
from .files import remove_stale_temporaries

CHECKPOINT_FILES = ("best.npz", "last.npz", "adapter_best.npz", "adapter_last.npz")    # a full run's, a LoRA run's
RUN_FILES = (*CHECKPOINT_FILES, "metrics.jsonl", "loss.svg")


# ------------------------------------------------------------------------------------------- the --out directory


def prepare_out_dir(out, resume, overwrite, init_from=None):
    """Clear what a killed save left in out, and refuse to start a new run over a trained one unless asked to, or
    over one that is training right now (lock_out_dir).

    Returns the files of the old run that a new run with --overwrite replaces (deleted only once training starts),
    and refuses if init_from, the checkpoint the new run starts from, is one of them."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise TinyPalmError(f"--out {out} is a file; --out names the directory a run writes its files to, pick another")
    if os.path.isdir(out):
        lock_out_dir(out)
    for path, size in remove_stale_temporaries(out):
        print(f"note: removed {path} ({size / 2**20:.1f} MB), left by a save that was killed; "
              "the checkpoints themselves are intact", file=sys.stderr)
    if resume:
        return []
    found = [name for name in CHECKPOINT_FILES if os.path.isfile(os.path.join(out, name))]
    if found and not overwrite:
        path = os.path.join(out, found[0])
        run = "LoRA run" if found[0].startswith("adapter_") else "trained run"
        raise TinyPalmError(f"--out {out} already holds a {run} ({path}: {checkpoint.describe(path)}); "
                            "continue it with --resume, pick another --out, or pass --overwrite to replace it")
    replaced = [os.path.join(out, name) for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    base = checkpoint.resolve(init_from) if init_from else None
    if base and os.path.exists(base) and any(os.path.samefile(base, path) for path in replaced):
        raise TinyPalmError(f"--init-from {init_from} is a checkpoint of the run in --out {out}, which --overwrite "
                            f"would delete; copy it out of {out} first, or pick another --out")
    return replaced


def start_out_dir(out, replaced, resume=False):
    """Make out, hold it (lock_out_dir), and with --overwrite delete the old run's files (the list prepare_out_dir
    returned): only once the new run is ready to start."""
    os.makedirs(out, exist_ok=True)
    lock_out_dir(out)
    # a run that started (and ended) in a new --out while this one was loading: now that out is held, look again
    arrived = [] if resume else [name for name in CHECKPOINT_FILES if os.path.join(out, name) not in replaced
                                 and os.path.isfile(os.path.join(out, name))]
    if arrived:
        raise TinyPalmError(f"--out {out} received a trained run ({arrived[0]}) from another train.py while this one "
                            "was starting; pick another --out, or pass --overwrite to replace it")
    if any(path.endswith(".npz") for path in replaced):
        print(f"--overwrite: replacing the run in {out} ({', '.join(os.path.basename(p) for p in replaced)})")
    for path in replaced:
        os.remove(path)


_LOCKED = {}          # the --out directories this process holds: path -> its open file descriptor


def lock_out_dir(out):
    """Hold out for this process alone until it ends, however it ends (the system drops the lock of a killed
    process too): a second run on the same --out, or a --resume of a run that is still training, is refused
    instead of mixing two runs' checkpoints and logs. Nothing is locked where there is no fcntl (Windows)."""
    if fcntl is None or os.path.abspath(out) in _LOCKED:
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TinyPalmError(f"--out {out} is in use by another training run right now; wait for it to end (and "
                            "--resume it then, if it is this one), or pick another --out") from None
    _LOCKED[os.path.abspath(out)] = fd


class StopRequest:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: the signal may arrive while the main thread is inside a print to the same stream,
        # and a second print there raises "reentrant call" instead of stopping cleanly
        os.write(sys.stdout.fileno(), b"\nCtrl-C: finishing this step, saving and stopping (Ctrl-C again to quit "
                                      b"at once)\n")

    def release(self):
        """From here on Ctrl-C interrupts at once (exit status 130): nothing is left unsaved."""
        signal.signal(signal.SIGINT, signal.default_int_handler)


class SaveSchedule:
    """Saves last.npz between evaluations every `every_s` seconds, so a kill -9 loses at most that much work.

    Cheap by construction: the interval stretches to at least 20 times what the last save took, so saving never
    costs more than about 5% of the training time, however large the model. every_s = 0: only at evaluations."""

    def __init__(self, every_s, clock=time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.last, self.took = clock(), 0.0

    def due(self):
        return self.every_s > 0 and self.clock() - self.last >= max(self.every_s, 20 * self.took)

    def saved(self, took):
        self.last, self.took = self.clock(), took


class Progress:
    """Training time per step, averaged over every step of this process (not only the last log interval), so the
    time-left estimate does not swing with one slow interval. Evaluation and saving are not counted."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def add(self, steps, seconds):
        self.steps += steps
        self.seconds += seconds

    def left(self, steps_to_go):
        return steps_to_go * self.seconds / max(1, self.steps)


# ------------------------------------------------------------------------------------------------------ memory


def training_bytes(cfg, batch_size, seq_len, dtype="float32", gradient_buffers=1, base_trains=True,
                   attention_matrix=True):
    """About the peak memory of one training step: weights, gradients (gradient_buffers of them: on numpy one per
    piece of the batch, batch_threads.py), AdamW's two moments, and the activations the backward pass keeps (per
    token and layer: the block's inputs, projections, attention weights, SwiGLU and branch outputs; then the
    logits). dtype is the --dtype name: bfloat16 weights take 2 bytes, their float32 master, gradients and moments
    4; the layers' activations are stored in the dtype, and the logits' are counted at 4 bytes, as the
    cross-entropy works in float32. attention_matrix False: attention by tiles (cuda/flash.cu) keeps no (T, T)
    attention weights. With base_trains False (LoRA) the weights are all there is of the base (no master,
    gradients or moments); the adapters' are left out, a fraction of a percent. An estimate, meant to catch what
    cannot fit, not to budget to the byte: for the full preset in bf16 at batch 16 x 1024 it says 21.4 GiB, and
    16.9 GiB without the attention matrix, where an H200 held 15.7 and 10.3 GiB."""
    weight, master = check_dtype(dtype).itemsize, compute_dtype(check_dtype(dtype)).itemsize
    D, F, H = cfg.d_model, cfg.d_ff, cfg.n_heads
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = 4 * D + 3 * q_dim + 3 * kv_dim + 6 * F + (H * seq_len if attention_matrix else 0)
    per_token = cfg.n_layers * per_layer * weight + 3 * cfg.vocab_size * master
    if base_trains:     # master (itself the weights unless bf16), gradients, two moments, and a bf16 copy
        per_param = (3 + gradient_buffers) * master + (weight if weight != master else 0)
    else:
        per_param = weight
    return per_param * cfg.n_params() + batch_size * seq_len * per_token


def attention_by_tiles(cfg, backend, dtype):
    """Whether the model's attention will run through cuda/flash.cu (no (T, T) matrix kept)."""
    if backend != "cupy":
        return False
    try:
        from .cuda.ops import flash_attention_applies
        return flash_attention_applies(dtype, cfg.head_dim)
    except Exception:                 # no usable GPU: building the model says so in its own words
        return False


def available_bytes(backend):
    """(bytes, "free" or "in all"): free memory where the arrays will live, host memory for numpy, the GPU's for
    cupy; on macOS, which does not say what is free, the machine's whole memory (a bound all the same). None if
    unknown (Windows)."""
    if backend == "cupy":
        try:
            import cupy
            return int(cupy.cuda.runtime.memGetInfo()[0]) + int(cupy.get_default_memory_pool().free_bytes()), "free"
        except Exception:                 # no CuPy or no GPU: building the model says so in its own words
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "free"
    except OSError:
        pass
    for pages, kind in (("SC_AVPHYS_PAGES", "free"), ("SC_PHYS_PAGES", "in all")):   # free (Linux), else all (macOS)
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGESIZE"), kind
        except (ValueError, OSError, AttributeError):
            pass
    return None


def check_memory(cfg, backend, batch_size, seq_len, dtype, what, base_trains=True, ranks_here=1):
    """Refuse, before allocating anything, a model that cannot fit; `what` names it for the message. base_trains
    False: LoRA, the weights with neither gradients nor AdamW state. ranks_here: the processes of an mpiexec run
    on this machine, which share its memory (on GPUs each has its own)."""
    buffers = 1
    if backend == "numpy":
        from . import batch_threads
        from .backend import settle_cpu_threads
        settle_cpu_threads()              # the thread count training will have: 1 where numpy's BLAS keeps the cores
        buffers = len(batch_threads.pieces(batch_size))
    need = training_bytes(cfg, batch_size, seq_len, dtype, gradient_buffers=buffers, base_trains=base_trains,
                          attention_matrix=not attention_by_tiles(cfg, backend, dtype))
    have, kind = available_bytes(backend) or (None, None)
    sharing = ranks_here if backend == "numpy" else 1
    if have is not None and need * sharing > have:
        where = "GPU memory" if backend == "cupy" else "memory"
        threads = (f" ({buffers} gradient buffers, one per thread: TINYPALM_NUM_THREADS=1 needs one)"
                   if buffers > 1 else "")
        parts = f"gradients{threads}, AdamW state and activations" if base_trains else "activations (LoRA)"
        size = f"{cfg.n_params() / 1e9:.2f}B" if cfg.n_params() >= 1e9 else f"{cfg.n_params() / 1e6:.2f}M"
        ranks = f" in each of the {sharing} processes on this machine" if sharing > 1 else ""
        raise TinyPalmError(f"{what} ({size} parameters) needs about {gib(need)} for weights, "
                            f"{parts} at batch {batch_size} x {seq_len}{ranks}, and the machine has only {gib(have)} "
                            f"of {where} {kind}; use a smaller preset or shape, or a smaller batch"
                            + (", or fewer processes" if sharing > 1 else ""))


def gib(n_bytes):
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes < 2**40 else f"{n_bytes / 2**40:,.1f} TiB"
