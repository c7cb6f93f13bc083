// LayerNorm without bias, twin of ops.layernorm_forward / ops.layernorm_backward.
// x, y, dy, dx: N rows of D, contiguous. gain (D,) of type W. mean, rstd (N,) float32: the cache.

// one block per row: two passes over the row (mean, then the centred variance), as the twin does
template <typename T, typename W>
__global__ void layernorm_forward(const T* x, const W* gain, T* y, float* mean_out, float* rstd_out, int D, float eps) {
    const T* xr = x + (long long)blockIdx.x * D;
    T* yr = y + (long long)blockIdx.x * D;
    float s = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) s += to_f32(xr[j]);
    float mean = block_sum(s) / D;
    float s2 = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { float c = to_f32(xr[j]) - mean; s2 += c * c; }
    float rstd = 1.f / sqrtf(block_sum(s2) / D + eps);
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        yr[j] = from_f32<T>((to_f32(xr[j]) - mean) * rstd * to_f32(gain[j]));
    if (threadIdx.x == 0) { mean_out[blockIdx.x] = mean; rstd_out[blockIdx.x] = rstd; }
}

// one block per row: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * gain
template <typename T, typename W>
__global__ void layernorm_backward_dx(const T* dy, const T* x, const W* gain, const float* mean, const float* rstd,
                                      T* dx, int D) {
    long long row = blockIdx.x;
    const T* dyr = dy + row * D;
    const T* xr = x + row * D;
    float mu = mean[row], rs = rstd[row];
    float a = 0.f, b = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float g = to_f32(dyr[j]) * to_f32(gain[j]), xhat = (to_f32(xr[j]) - mu) * rs;
        a += g;
        b += g * xhat;
    }
    a = block_sum(a) / D;
    b = block_sum(b) / D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float g = to_f32(dyr[j]) * to_f32(gain[j]), xhat = (to_f32(xr[j]) - mu) * rs;
        dx[row * D + j] = from_f32<T>((g - a - xhat * b) * rs);
    }
}

// d_gain (D,) float32 += sum over rows of dy * xhat. Grid (ceil(D / blockDim.x), chunks): a thread sums one
// column over a chunk of rows (coalesced along the row), then adds its partial sum atomically.
template <typename T>
__global__ void layernorm_backward_dgain(const T* dy, const T* x, const float* mean, const float* rstd, float* d_gain,
                                         int N, int D, int rows_per_chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) {
        long long at = (long long)r * D + j;
        acc += to_f32(dy[at]) * (to_f32(x[at]) - mean[r]) * rstd[r];
    }
    atomicAdd(d_gain + j, acc);
}
