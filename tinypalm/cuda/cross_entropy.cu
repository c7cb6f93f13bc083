// Cross-entropy with z-loss over the logits, twin of ops.cross_entropy_forward / cross_entropy_backward and of
// ops.masked_cross_entropy_forward / masked_cross_entropy_backward (the mask weighs the rows outside and in the backward).
// logits (N, V) of T, read directly: no float32 copy of them is made. targets (N,) int64. One block per row.
// per row: log_z = logsumexp(logits), row_loss = log_z - logit[target] + z_loss * log_z^2 (the mean is taken outside)

template <typename T>
__global__ void cross_entropy_forward(const T* logits, const long long* targets, float* log_z, float* row_loss, int V,
                                      float z_loss) {
    long long row = blockIdx.x;
    const T* lr = logits + row * V;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, to_f32(lr[j]));
    m = block_max(m);
    float s = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += expf(to_f32(lr[j]) - m);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        float lz = logf(s) + m;
        log_z[row] = lz;
        row_loss[row] = lz - to_f32(lr[targets[row]]) + z_loss * lz * lz;
    }
}

// dlogits_j = w (p_j (1 + 2 z_loss log_z) - [j == target]), p_j = exp(logit_j - log_z), w the row's weight:
// row_weight[row] (masked: mask / counted positions, 0 on rows not counted), or inv_n (1/N) where it is null
template <typename T>
__global__ void cross_entropy_backward(const T* logits, const long long* targets, const float* log_z, T* dlogits, int V,
                                       float z_loss, float inv_n, const float* row_weight) {
    long long row = blockIdx.x;
    const T* lr = logits + row * V;
    float lz = log_z[row];
    float w = row_weight != nullptr ? row_weight[row] : inv_n;
    float k = (1.f + 2.f * z_loss * lz) * w;
    long long t = targets[row];
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        dlogits[row * V + j] = from_f32<T>(expf(to_f32(lr[j]) - lz) * k - (j == t ? w : 0.f));
}
