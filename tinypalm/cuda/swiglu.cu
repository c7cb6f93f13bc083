// SwiGLU, twin of ops.swiglu_forward / ops.swiglu_backward. gate, up, dhidden: N rows of F with row strides
// (they are column slices of the fused projection); outputs contiguous (N, F). sig(a) = (1 + tanh(a/2)) / 2.

__device__ __forceinline__ float sigmoid_f32(float a) { return 0.5f * (1.f + tanhf(0.5f * a)); }

template <typename T>
__global__ void swiglu_forward(const T* gate, const T* up, T* hidden, long long n, int F, long long ld_gate,
                               long long ld_up) {
    FOR_EACH(i, n) {
        long long r = i / F, c = i % F;
        float g = to_f32(gate[r * ld_gate + c]), u = to_f32(up[r * ld_up + c]);
        hidden[i] = from_f32<T>(g * sigmoid_f32(g) * u);
    }
}

// d_up = dh * silu(g);  d_gate = dh * up * sig * (1 + g (1 - sig))
template <typename T>
__global__ void swiglu_backward(const T* dhidden, const T* gate, const T* up, T* d_gate, T* d_up, long long n, int F,
                                long long ld_dh, long long ld_gate, long long ld_up) {
    FOR_EACH(i, n) {
        long long r = i / F, c = i % F;
        float dh = to_f32(dhidden[r * ld_dh + c]);
        float g = to_f32(gate[r * ld_gate + c]), u = to_f32(up[r * ld_up + c]);
        float sig = sigmoid_f32(g);
        d_up[i] = from_f32<T>(dh * g * sig);
        d_gate[i] = from_f32<T>(dh * u * sig * (1.f + g * (1.f - sig)));
    }
}
