// Causal softmax for attention, the masking and the softmax of ops.attention_forward / attention_backward.
// Rows are (batch, kv head, g, query t) flattened: row r holds query t = (r % GT) % Tq at position first_pos + t,
// which sees keys 0 .. first_pos + t of its S. The mask is applied by position here: no mask array is read.
// scores, dprobs: float32 (the GEMMs write float32); probs, dscores: T. One block per row.

template <typename T>
__global__ void causal_softmax_forward(const float* scores, T* probs, int S, int GT, int Tq, int first_pos) {
    long long row = blockIdx.x;
    int last = min(S - 1, first_pos + (int)((row % GT) % Tq));       // the last key this query may see
    const float* sr = scores + row * S;
    T* pr = probs + row * S;
    float m = NEG_INF;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, sr[j]);
    m = block_max(m);
    float s = 0.f;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) s += expf(sr[j] - m);
    float inv = 1.f / block_sum(s);
    for (int j = threadIdx.x; j < S; j += blockDim.x) pr[j] = from_f32<T>(j <= last ? expf(sr[j] - m) * inv : 0.f);
}

// dscores_j = p_j (dp_j - sum_i p_i dp_i); masked keys have p = 0 and get 0
template <typename T>
__global__ void causal_softmax_backward(const float* dprobs, const T* probs, T* dscores, int S) {
    long long row = blockIdx.x;
    const float* dpr = dprobs + row * S;
    const T* pr = probs + row * S;
    float s = 0.f;
    for (int j = threadIdx.x; j < S; j += blockDim.x) s += to_f32(pr[j]) * dpr[j];
    s = block_sum(s);
    for (int j = threadIdx.x; j < S; j += blockDim.x)
        dscores[row * S + j] = from_f32<T>(to_f32(pr[j]) * (dpr[j] - s));
}
