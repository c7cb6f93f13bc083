// Embedding backward without add.at, twin of ops.embedding_backward: d_embed (V, D) float32 += the rows of dx
// (N, D) at their tokens. One thread per element of dx; a token repeated in the batch adds atomically.
template <typename T>
__global__ void embedding_backward(float* d_embed, const T* dx, const long long* tokens, long long n, int D) {
    FOR_EACH(i, n) {
        long long r = i / D;
        int c = (int)(i % D);
        atomicAdd(d_embed + tokens[r] * D + c, to_f32(dx[i]));
    }
}
