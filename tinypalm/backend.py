"""The one place that chooses the array library.

Everything else receives `xp` (numpy or cupy) and calls only functions both libraries share.
"""

import functools
import importlib.util
import types

import numpy

from . import ops
from .errors import TinyPalmError

DTYPES = ("float64", "float32", "bfloat16")


def get_xp(backend):
    if backend == "numpy":
        keep_freed_memory()
        return numpy
    if backend != "cupy":
        raise TinyPalmError(f"unknown backend {backend!r}; use 'numpy' (CPU) or 'cupy' (NVIDIA GPU)")
    try:
        import cupy
    except Exception as e:  # not installed, or its CUDA libraries failed to load
        raise TinyPalmError(f"--backend cupy needs CuPy ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'not importable'}); "
                            "install it with `pip install -e .[cuda12]` or `.[cuda13]`, or use --backend numpy") from None
    if not cupy.is_available():
        raise TinyPalmError("--backend cupy: CuPy is installed but no CUDA GPU is visible; "
                            "check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or use --backend numpy")
    return cupy


def get_ops(backend):
    """The op functions a model on this backend calls: ops.py's, with the backend's faster twins laid over them.

    Each twin has exactly the signature of the ops.py function it replaces and is tested against it."""
    plain = {name: getattr(ops, name) for name in dir(ops) if not name.startswith("_")
             and callable(getattr(ops, name)) and getattr(getattr(ops, name), "__module__", None) == ops.__name__}
    return types.SimpleNamespace(**{**plain, **op_overrides(backend)})     # a twin replaces its plain function


def settle_cpu_threads():
    """BLAS to one thread and tinypalm's pool (cpu_ops.py) to one thread per core; where numpy's BLAS cannot be set
    (Accelerate, MKL), the pool to one thread instead, and BLAS has the cores alone."""
    from . import cpu_ops
    if set_blas_threads(1) is None:
        cpu_ops.pool.n_threads = 1


def op_overrides(backend):
    """Faster twins of ops.py functions on this backend: name -> function.

    On numpy: cpu_ops.py's chunked twins, run by its thread pool with BLAS itself single-threaded. On cupy: the
    CUDA kernels of tinypalm.cuda, where that package exists and this CuPy can build kernels (has RawModule);
    anything else, a test double of CuPy included, runs the plain ops.py functions."""
    if backend == "numpy":
        from . import cpu_ops
        settle_cpu_threads()
        return cpu_ops.twins()
    if backend != "cupy" or importlib.util.find_spec(f"{__package__}.cuda") is None:
        return {}
    import cupy
    if not hasattr(cupy, "RawModule"):
        return {}
    return cuda_overrides()


def batch_splitter(backend):
    """How a model runs a batch on this backend: None, all of it in one pass through the model (what a GPU
    wants), or on numpy the module batch_threads, whose loss_and_grads and forward cut its rows into one piece
    per thread."""
    if backend != "numpy":
        return None
    from . import batch_threads
    return batch_threads


def fused_adamw(flat, runs):
    """AdamW's whole step over one flat vector as a single kernel launch, where the backend has one (the CUDA
    kernel of tinypalm.cuda): a function (p, g, m, v, lr, beta1, beta2, eps, weight_decay, t), or None, and then
    optim.AdamW runs its array passes."""
    if array_module(flat) is numpy or not op_overrides("cupy"):
        return None
    from .cuda.ops import adamw_flat, adamw_ranges
    decay, frozen = adamw_ranges(runs, flat.size)

    def step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
        adamw_flat(p, g, m, v, decay, lr, beta1, beta2, eps, weight_decay, t, frozen=frozen or None)
    return step


def array_module(a):
    """numpy or cupy: the library an array belongs to."""
    return numpy if isinstance(a, numpy.ndarray) else get_xp("cupy")


def map_ranges(a, ranges, fn):
    """fn(start, stop, *rest) over every (start, stop, *rest) in ranges of the flat array a, for element-wise work.

    On numpy the ranges are cut into cache-sized pieces that cpu_ops' thread pool runs on every core; on a GPU
    each range is one call (one kernel per operation is what a GPU wants)."""
    if not isinstance(a, numpy.ndarray):
        for start, stop, *rest in ranges:
            fn(start, stop, *rest)
        return
    from . import cpu_ops
    chunk = max(1, cpu_ops.ELEMENTWISE_CHUNK_BYTES // a.itemsize)
    pieces = [(i, min(i + chunk, stop), *rest) for start, stop, *rest in ranges for i in range(start, stop, chunk)]
    cpu_ops.pool.run(lambda piece: fn(*piece), pieces)


def set_blas_threads(n):
    """Set the thread count of numpy's bundled OpenBLAS (scipy-openblas) for the whole process; returns n, or
    None when numpy uses a BLAS we cannot reach this way (then nothing changes).

    One thread: tinypalm's own pool (cpu_ops.py) splits the work, and OpenBLAS's threads, which spin at a
    barrier after every matmul, would wait on each other whenever another program holds a core."""
    fn = _blas_set_num_threads()
    if fn is None:
        return None
    fn(n)
    return n


@functools.lru_cache(maxsize=None)
def _blas_set_num_threads():
    """OpenBLAS's set_num_threads from the library numpy's wheel bundles (numpy.libs/ or numpy/.dylibs/)."""
    import ctypes
    import glob
    import os
    numpy_dir = os.path.dirname(numpy.__file__)
    candidates = glob.glob(os.path.join(numpy_dir + ".libs", "*openblas*")) \
        + glob.glob(os.path.join(numpy_dir, ".dylibs", "*openblas*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                return fn
    return None


def cuda_overrides():
    """op name -> the CUDA-kernel function that replaces the ops.py function of that name on the cupy backend.

    Each has exactly the signature of the function it replaces (tinypalm/cuda/ops.py). Imported only when asked
    for, so the numpy backend never loads it."""
    from .cuda.ops import OVERRIDES
    return dict(OVERRIDES)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed blocks instead of returning them to the OS.

    A training step frees and reallocates the same large temporaries every time. By default glibc serves blocks
    over 128 KB with mmap and unmaps them on free, so the next step pays a page fault for every 4 KB it touches:
    on the CPU benchmark that was 40% of the step. Raising the mmap and trim thresholds keeps that memory in the
    heap for reuse. Harmless elsewhere: without glibc (macOS, Windows) this does nothing."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)        # the most glibc's own sliding threshold reaches on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError, TypeError):      # TypeError: Windows' CDLL takes no None
        pass


def address(array):
    """Where an array's data starts: a device pointer for cupy, a host address for numpy (numpy playing cupy in
    the tests, bfloat16 included)."""
    return array.ctypes.data if isinstance(array, numpy.ndarray) else array.data.ptr


def to_numpy(a):
    """A host numpy copy of an array from either backend (on a GPU: one device-to-host copy, a synchronisation)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, numpy.ndarray) else numpy.asarray(a)


def read_scalars(xp, *scalars):
    """Python floats of device scalars (0-d arrays), brought to the host together: one synchronisation.

    The training loop reads the loss and the gradient norm this way, once per optimizer step."""
    return [float(v) for v in to_numpy(xp.stack([xp.asarray(s, dtype=xp.float64) for s in scalars]))]


def check_dtype(dtype):
    """The numpy dtype of a --dtype name. bfloat16 comes from ml_dtypes (CuPy uses the same type), imported only
    when it is asked for."""
    if dtype not in DTYPES:
        raise TinyPalmError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TinyPalmError("--dtype bfloat16 needs ml_dtypes: `pip install ml_dtypes` (the cuda12 and cuda13 "
                                "extras include it), or use --dtype float32") from None
        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(dtype)


def compute_dtype(dtype):
    """The dtype arithmetic runs in for arrays stored as `dtype`: float32 for bfloat16, else dtype itself."""
    return numpy.promote_types(dtype, numpy.float32)
