"""A strict stand-in for CuPy, over NumPy: runs tinypalm's cupy code path on a machine without a GPU.

Test code only: the tests put tests/standin on PYTHONPATH (or this module in sys.modules as "cupy"), and nothing
in tinypalm knows it exists. It is stricter than CuPy where CuPy would only be slow, and it follows CuPy where
CuPy differs from NumPy:

- Device arrays are their own type (`ndarray`, wrapping a NumPy array). Arithmetic with a host NumPy array is a
  TypeError, as in CuPy; NumPy scalars and Python scalars are fine. `asarray`/`array` copy host data in.
- Every device-to-host read is a synchronisation on a GPU. Explicit reads (`.get()`, `cupy.asnumpy`) are
  counted in `reads`, by the nearest call site ("folder/file.py:line (function)") outside this module and
  tinypalm/backend.py (whose to_numpy and read_scalars only forward a read). Implicit reads raise
  `ImplicitTransfer` (a TypeError): `numpy.asarray(device_array)` (which CuPy refuses too), `float()`,
  `int()`, `bool()`, `.item()`, `.tolist()`, formatting, and indexing with a boolean device mask (CuPy runs
  nonzero() on the host's behalf). Inside `with allow_implicit():` they are counted instead.
- bfloat16 (ml_dtypes.bfloat16, as in CuPy 14): `matmul`/`dot` of two bf16 operands return bf16 (float32
  accumulation, one rounding); matmul with more than two dimensions on bf16 raises TypeError, as do
  `einsum` and `add.at` on bf16; `sum`/`mean` of bf16 accumulate in float32 and return bf16. Python scalars
  promote bf16 to float32 exactly as NumPy with ml_dtypes does, which is CuPy's rule too.
- `is_available()` is True; `cuda.Device().synchronize()` counts in `device_syncs`; memory pools are stubs.
- There is no RawModule/ElementwiseKernel: tinypalm's CUDA kernels cannot load, so their ops.py twins run.

Set CUPY_STANDIN_REPORT to a path to get {"reads": {site: count}, "device_syncs": n} written there at exit.
"""

import atexit
import builtins
import collections
import contextlib
import json
import operator
import os
import sys
import types

import numpy

__version__ = "14.2.0+standin"

_HERE = os.path.dirname(os.path.abspath(__file__))
_FORWARDERS = (os.path.join("tinypalm", "backend.py"),)      # frames that only pass a read on

reads = collections.Counter()        # "path:line (function)" -> explicit device-to-host reads
device_syncs = collections.Counter()
_implicit_allowed = [0]


class ImplicitTransfer(TypeError):
    """A device-to-host read that the code did not ask for explicitly."""


def _site():
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not os.path.abspath(path).startswith(_HERE) and not path.endswith(_FORWARDERS):
            where = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
            return f"{where}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def reset():
    reads.clear()
    device_syncs.clear()


@contextlib.contextmanager
def allow_implicit():
    """Let implicit reads happen (counted in `reads`) inside this block."""
    _implicit_allowed[0] += 1
    try:
        yield
    finally:
        _implicit_allowed[0] -= 1


def _implicit(what):
    if not _implicit_allowed[0]:
        raise ImplicitTransfer(f"implicit device-to-host read ({what}) at {_site()}: on a GPU this synchronises; "
                               "read explicitly (backend.to_numpy / read_scalars), once per step at most")
    reads[_site()] += 1


def _is_bf16(dtype):
    return numpy.dtype(dtype).name == "bfloat16"


# --- moving between the wrapper and NumPy -------------------------------------------------------------------

def _unwrap(x, host_ok=False):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        if host_ok:
            return x
        raise TypeError(f"a host numpy.ndarray {x.shape} met a device array: CuPy does not mix them "
                        "(move it with cupy.asarray)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, host_ok) for v in x)
    return x


def _wrap(x):
    if isinstance(x, numpy.ndarray):
        return ndarray(x)
    if isinstance(x, numpy.generic):                 # CuPy reductions give 0-d device arrays, not scalars
        return ndarray(numpy.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _matmul(a, b):
    # CuPy 14: bf16 only in 2-D; bf16 @ bf16 -> bf16 (cuBLAS accumulates in float32, rounds once)
    if _is_bf16(a.dtype) or _is_bf16(b.dtype):
        if a.ndim > 2 or b.ndim > 2:
            raise TypeError("data type 'E' not understood (CuPy 14 matmul on bfloat16 with more than two dimensions)")
        if _is_bf16(a.dtype) and _is_bf16(b.dtype):
            return numpy.matmul(a.astype(numpy.float32), b.astype(numpy.float32)).astype(a.dtype)
    return numpy.matmul(a, b)


def _reduce_bf16(a, name, axis=None, dtype=None, out=None, keepdims=False, **kw):
    # CuPy sums bf16 in float32 and returns bf16; numpy (ml_dtypes) would accumulate in bf16
    if dtype is None and _is_bf16(a.dtype) and name in ("sum", "mean"):
        return getattr(a, name)(axis=axis, dtype=numpy.float32, keepdims=keepdims, **kw).astype(a.dtype)
    return getattr(a, name)(axis=axis, dtype=dtype, out=out, keepdims=keepdims, **kw)


# --- the device array -----------------------------------------------------------------------------------------

class ndarray:
    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, a):
        assert isinstance(a, numpy.ndarray)
        self._a = a

    # shape and layout: plain host metadata, no read
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray(self._a[i]) for i in range(len(self._a)))

    def __repr__(self):
        return f"standin.ndarray(shape={self.shape}, dtype={self.dtype})"

    __str__ = __repr__

    # explicit reads
    def get(self, stream=None, out=None):
        reads[_site()] += 1
        return self._a.copy()

    # implicit reads
    def __array__(self, dtype=None, copy=None):
        raise ImplicitTransfer("Implicit conversion to a NumPy array is not allowed. "
                               "Please use `.get()` to construct a NumPy array explicitly.")

    def __float__(self):
        _implicit("float()")
        return float(self._a)

    def __int__(self):
        _implicit("int()")
        return int(self._a)

    def __index__(self):
        _implicit("index")
        return operator.index(self._a)

    def __bool__(self):
        _implicit("bool()")
        return bool(self._a)

    def __format__(self, spec):
        _implicit("format")
        return format(self._a.item() if self.ndim == 0 else self._a, spec)

    def item(self):
        _implicit(".item()")
        return self._a.item()

    def tolist(self):
        _implicit(".tolist()")
        return self._a.tolist()

    # views, copies, casts
    def reshape(self, *shape, **kw):
        return ndarray(self._a.reshape(*shape, **kw))

    def transpose(self, *axes):
        return ndarray(self._a.transpose(*axes))

    def swapaxes(self, a, b):
        return ndarray(self._a.swapaxes(a, b))

    def ravel(self):
        return ndarray(self._a.ravel())

    def view(self, dtype=None):
        return ndarray(self._a.view(dtype) if dtype is not None else self._a.view())

    def astype(self, dtype, copy=True, **kw):
        return ndarray(self._a.astype(dtype, copy=copy, **kw))

    def copy(self):
        return ndarray(self._a.copy())

    def fill(self, value):
        self._a.fill(value)

    def clip(self, a_min=None, a_max=None):
        return ndarray(numpy.asarray(self._a.clip(_unwrap(a_min), _unwrap(a_max))))

    # reductions: 0-d device arrays, bf16 accumulated in float32
    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return _wrap(_reduce_bf16(self._a, "sum", axis, dtype, _unwrap(out), keepdims))

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        return _wrap(_reduce_bf16(self._a, "mean", axis, dtype, _unwrap(out), keepdims))

    def max(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.max(axis=axis, keepdims=keepdims))

    def min(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.min(axis=axis, keepdims=keepdims))

    def argmax(self, axis=None):
        return _wrap(self._a.argmax(axis=axis))

    def all(self, axis=None, keepdims=False):
        return _wrap(self._a.all(axis=axis, keepdims=keepdims))

    def any(self, axis=None, keepdims=False):
        return _wrap(self._a.any(axis=axis, keepdims=keepdims))

    def var(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._a.var(axis=axis, dtype=dtype or (numpy.float32 if _is_bf16(self.dtype) else None),
                                 keepdims=keepdims))

    # indexing
    @staticmethod
    def _key(key):
        parts = key if isinstance(key, tuple) else (key,)
        for k in parts:
            if isinstance(k, ndarray) and k.dtype == numpy.bool_ and k.ndim > 0:
                _implicit("boolean-mask indexing")
        return _unwrap(key, host_ok=True)

    def __getitem__(self, key):
        return _wrap(self._a[self._key(key)])

    def __setitem__(self, key, value):
        self._a[self._key(key)] = _unwrap(value, host_ok=True)

    # NumPy interoperation, as CuPy's: numpy ufuncs and functions on device arrays run on the device
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        try:
            impl = globals()[func.__name__] if func.__name__ in _FUNCTIONS else __getattr__(func.__name__)
        except AttributeError:
            return NotImplemented
        return impl(*args, **kwargs)


def _operator(name):
    return getattr(operator, name + "_" if name in ("and", "or") else name)


def _binary(op, reflected=False):
    fn = _operator(op)

    def method(self, other):
        other = _unwrap(other)
        if op == "matmul":
            return _wrap(_matmul(other, self._a) if reflected else _matmul(self._a, other))
        return _wrap(fn(other, self._a) if reflected else fn(self._a, other))
    return method


def _inplace(op):
    fn = _operator(f"i{op}")

    def method(self, other):
        if op == "matmul":
            raise TypeError("in-place matmul is not supported")
        result = fn(self._a, _unwrap(other))
        assert result is self._a
        return self
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
            "rshift"):
    setattr(ndarray, f"__{_op}__", _binary(_op))
    setattr(ndarray, f"__r{_op}__", _binary(_op, reflected=True))
    setattr(ndarray, f"__i{_op}__", _inplace(_op))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_op}__", _binary(_op))
ndarray.__neg__ = lambda self: ndarray(-self._a)
ndarray.__abs__ = lambda self: ndarray(abs(self._a))
ndarray.__invert__ = lambda self: ndarray(~self._a)


# --- module functions ------------------------------------------------------------------------------------------

class ufunc:
    def __init__(self, f):
        self._f = f
        self.__name__ = f.__name__

    def __call__(self, *args, out=None, **kwargs):
        if out is not None:
            self._f(*_unwrap(args), out=_unwrap(out), **kwargs)
            return out
        return _wrap(self._f(*_unwrap(args), **kwargs))

    def at(self, a, indices, b=None):
        if _is_bf16(a.dtype) or (b is not None and _is_bf16(getattr(b, "dtype", numpy.float32))):
            raise TypeError(f"cupy.{self.__name__}.at only supports int32, int64, uint32, uint64, float16, "
                            "float32, float64, complex64 and complex128 (got bfloat16)")
        if b is None:
            self._f.at(_unwrap(a), _unwrap(indices, host_ok=True))
        else:
            self._f.at(_unwrap(a), _unwrap(indices, host_ok=True), _unwrap(b))


def _function(name, f, host_ok=False):
    def wrapper(*args, **kwargs):
        args = _unwrap(args, host_ok)
        kwargs = {k: _unwrap(v, host_ok) for k, v in kwargs.items()}
        return _wrap(f(*args, **kwargs))
    wrapper.__name__ = name
    return wrapper


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or numpy.dtype(dtype) == a.dtype else a.astype(dtype)
    return ndarray(numpy.array(_unwrap(a, host_ok=True), dtype=dtype, copy=True))     # host to device: a copy


def array(a, dtype=None, copy=True, order=None):
    return ndarray(numpy.array(_unwrap(a, host_ok=True), dtype=dtype, copy=True))


def asnumpy(a, stream=None, out=None):
    if isinstance(a, ndarray):
        reads[_site()] += 1
        return a._a.copy()
    return numpy.asarray(a)


def matmul(a, b, out=None):
    result = _matmul(_unwrap(a), _unwrap(b))
    if out is not None:
        out._a[...] = result
        return out
    return _wrap(result)


def dot(a, b, out=None):
    return matmul(a, b, out)


def einsum(subscripts, *operands, **kwargs):
    if any(_is_bf16(o.dtype) for o in operands):
        raise TypeError("data type 'E' not understood (CuPy 14 einsum on bfloat16)")
    return _wrap(numpy.einsum(subscripts, *_unwrap(operands), **kwargs))


def sum(a, axis=None, dtype=None, out=None, keepdims=False):
    return asarray(a).sum(axis=axis, dtype=dtype, keepdims=keepdims)


def mean(a, axis=None, dtype=None, out=None, keepdims=False):
    return asarray(a).mean(axis=axis, dtype=dtype, keepdims=keepdims)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else numpy


def is_available():
    return True


_FUNCTIONS = {"sum", "mean", "matmul", "dot", "einsum"}


def __getattr__(name):
    """Everything else comes from NumPy: types and constants as they are, ufuncs and functions on device arrays."""
    attr = getattr(numpy, name)
    if isinstance(attr, numpy.ufunc):
        wrapped = ufunc(attr)
    elif isinstance(attr, type) or not callable(attr):
        return attr
    else:
        wrapped = _function(name, attr)
    globals()[name] = wrapped
    _FUNCTIONS.add(name)
    return wrapped


# --- cupy.cuda and the memory pools ---------------------------------------------------------------------------

class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


_POOL, _PINNED_POOL = _MemoryPool(), _MemoryPool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _PINNED_POOL


class _Device:
    def __init__(self, device=0):
        self.id = device
        self.compute_capability = "90"

    def synchronize(self):
        device_syncs[_site()] += 1

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = types.ModuleType(f"{__name__}.cuda")
cuda.Device = _Device
cuda.is_available = is_available
cuda.MemoryPool = _MemoryPool
cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (80 * 2**30, 80 * 2**30))
sys.modules[cuda.__name__] = cuda


def _report():
    path = os.environ.get("CUPY_STANDIN_REPORT")
    if path:
        with builtins.open(path, "w") as f:
            json.dump({"reads": dict(reads), "device_syncs": builtins.sum(device_syncs.values())}, f, indent=1)


atexit.register(_report)
