// The optimizer step over flat float32 buffers: the global gradient norm and AdamW, each one pass.

// *sum_sq (double, zeroed by the caller) += sum of g^2; a block adds its partial sum once
__global__ void sum_squares(const float* g, long long n, double* sum_sq) {
    float acc = 0.f;
    FOR_EACH(i, n) { float x = g[i]; acc += x * x; }
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(sum_sq, (double)acc);
}

__global__ void sqrt_to_float(const double* sum_sq, float* norm) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *norm = (float)sqrt(*sum_sq);
}

// AdamW, as optim.AdamW: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p *= 1 - lr wd where decay[i];
// p -= step_size * m / (sqrt(v / v_correction) + eps), step_size = lr / (1 - b1^t), v_correction = 1 - b2^t.
// Optional (null pointer: off): decay (n,) bytes, 1 where weight decay applies; frozen (n,) bytes, 1 where the
// parameter is frozen (left as it is);
// grad_norm, a device scalar: g is scaled by max_norm / (norm + 1e-6) when norm > max_norm (global-norm clipping
// without reading the norm on the host); p_compute, the bf16 compute copy of p, rewritten in the same pass.
__global__ void adamw_flat(float* p, const float* g, float* m, float* v, const unsigned char* decay,
                           const unsigned char* frozen, __nv_bfloat16* p_compute, const float* grad_norm, long long n,
                           float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                           float v_correction, float max_norm) {
    float scale = 1.f;
    if (grad_norm != nullptr && max_norm > 0.f) {
        float norm = *grad_norm;
        if (norm > max_norm) scale = max_norm / (norm + 1e-6f);
    }
    FOR_EACH(i, n) {
        if (frozen != nullptr && frozen[i]) continue;
        float gi = g[i] * scale;
        float mi = beta1 * m[i] + (1.f - beta1) * gi;
        float vi = beta2 * v[i] + (1.f - beta2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        float pi = p[i];
        if (decay != nullptr && decay[i]) pi *= 1.f - lr * weight_decay;
        pi -= step_size * mi / (sqrtf(vi / v_correction) + eps);
        p[i] = pi;
        if (p_compute != nullptr) p_compute[i] = __float2bfloat16_rn(pi);
    }
}
