"""CUDA kernels for the cupy backend, each the twin of an ops.py function.

    source.py   the .cu files, their template instances, NVRTC compilation (also without a GPU)
    gemm.py     row-major (batched) GEMMs through cuBLAS, with transposes, strides and alpha/beta as arguments
    ops.py      OVERRIDES: op name -> kernel-backed function with the exact signature of the ops.py function it
                replaces; adamw_flat and global_grad_norm for the optimizer

Nothing here is imported on the numpy backend.
"""
