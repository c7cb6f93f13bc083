"""The CUDA C sources of the kernels, the template instances each one needs, and how to compile them.

Each .cu file in this folder is compiled with common.cuh in front of it. On a GPU, CuPy's RawModule compiles it
for the device (`module(name)`); `compile_cubin(name, arch)` compiles it through NVRTC for a named architecture
with no GPU at all, which is how CI checks every kernel for sm_80 and sm_90.
"""

import functools
import glob
import os
from importlib import resources

F32, BF16 = "float", "__nv_bfloat16"
STORAGE = (F32, BF16)            # the element types every kernel is instantiated for (float32 runs, bf16 runs)
FLASH_HEAD_DIMS = (16, 32, 64)   # head widths flash.cu is instantiated for (a multiple of 16, at most 64)


def _instances(template, *type_lists):
    out = [template]
    for types in type_lists:
        out = [s.replace("{}", t, 1) for s in out for t in types]
    return out


# file -> the kernel names (template instances) that tinypalm.cuda.ops launches
KERNELS = {
    # x and its gain: same type, or bf16 activations with a float32 gain
    "layernorm": (_instances("layernorm_forward<{}, {}>", STORAGE, STORAGE)
                  + _instances("layernorm_backward_dx<{}, {}>", STORAGE, STORAGE)
                  + _instances("layernorm_backward_dgain<{}>", STORAGE)),
    "rope": _instances("rope<{}, {}>", STORAGE, STORAGE),
    "swiglu": _instances("swiglu_forward<{}>", STORAGE) + _instances("swiglu_backward<{}>", STORAGE),
    "softmax": _instances("causal_softmax_forward<{}>", STORAGE) + _instances("causal_softmax_backward<{}>", STORAGE),
    "cross_entropy": (_instances("cross_entropy_forward<{}>", STORAGE)
                      + _instances("cross_entropy_backward<{}>", STORAGE)),
    "embedding": _instances("embedding_backward<{}>", STORAGE),
    "dropout": ["dropout_mask"] + _instances("dropout_apply<{}>", STORAGE),
    "adamw": ["sum_squares", "sqrt_to_float", "adamw_flat"],
    # byte rows in 16-, 4- or 2-byte units (COPY_UNITS)
    "copy": [f"copy_rows<{unit}>" for unit in ("uint4", "unsigned int", "unsigned short")],
    # bf16 attention by tiles, for each head width of FLASH_HEAD_DIMS
    "flash": [f"{kernel}<{dh}>" for kernel in ("flash_forward", "flash_backward_prep", "flash_backward_dq",
                                               "flash_backward_dkdv") for dh in FLASH_HEAD_DIMS] + ["flash_sum_chunks"],
}

OPTIONS = ("--std=c++17",)


def kernel_source(name):
    """common.cuh followed by <name>.cu, as one string."""
    folder = resources.files(__package__)
    return (folder.joinpath("common.cuh").read_text(encoding="utf-8") + "\n"
            + folder.joinpath(f"{name}.cu").read_text(encoding="utf-8"))


def ctype(dtype):
    """The C storage type of a float32 or bfloat16 numpy/cupy dtype; None for any other (no kernel for it)."""
    if dtype.name == "float32":
        return F32
    if dtype.name == "bfloat16":
        return BF16
    return None


@functools.cache
def cuda_include_dir():
    """The folder holding cuda_bf16.h: from the nvidia-cuda-runtime wheel, else a CUDA toolkit on this machine."""
    try:
        from cuda import pathfinder                 # comes with CuPy 14
        found = pathfinder.find_nvidia_header_directory("cudart")
        if found and os.path.exists(os.path.join(found, "cuda_bf16.h")):
            return found
    except Exception:                               # not installed, or an older pathfinder without this function
        pass
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    try:
        import nvidia                                # the namespace package the NVIDIA wheels install into
        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    candidates += ["/usr/local/cuda/include"]
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "cuda_bf16.h")):
            return folder
    raise RuntimeError("cannot find the CUDA headers (cuda_bf16.h): install tinypalm with its cuda12 or cuda13 extra, "
                       "or set CUDA_PATH to a CUDA toolkit")


def compile_options():
    return OPTIONS + (f"-I{cuda_include_dir()}",)


def compile_cubin(name, arch):
    """Compile <name>.cu and all its instances for a real architecture (e.g. "sm_90") through NVRTC, without a GPU.

    Returns the cubin bytes and {instance: lowered (mangled) name}. A real sm_XX target makes ptxas run, so an error
    that only shows in machine code (bad inline PTX, too many registers) fails here too. Raises RuntimeError with
    NVRTC's log on a compile error."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(kernel_source(name), f"{name}.cu", (), ())
    try:
        for expr in KERNELS[name]:
            nvrtc.addNameExpression(prog, expr)
        try:
            # -ftz=true: CuPy adds it to every kernel it compiles
            nvrtc.compileProgram(prog, (f"-arch={arch}", "-ftz=true") + compile_options())
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"{name}.cu for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in KERNELS[name]}
        return nvrtc.getCUBIN(prog), lowered
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def module(name):
    """The compiled cupy.RawModule of <name>.cu for the current GPU (compiled once, then from CuPy's cache)."""
    import cupy
    return cupy.RawModule(code=kernel_source(name), options=compile_options(), name_expressions=KERNELS[name])


def kernel(name, instance):
    return module(name).get_function(instance)
