// Dropout, twin of ops.dropout_mask / dropout_forward / dropout_backward. The mask is the same counter hash as
// the twin's, bit for bit: element i is kept when mix32((first + i) * 0x9E3779B1 + key) >= threshold, with uint32
// arithmetic wrapping as numpy's does; key = mix32(seed) and threshold = rate * 2^32 come from the host.

// murmur3's 32-bit finaliser
__device__ __forceinline__ unsigned int mix32(unsigned int h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

// first: the index of keep[0] in a larger mask (a piece of a batch draws its rows of the batch's mask)
__global__ void dropout_mask(bool* keep, long long n, unsigned int first, unsigned int key, unsigned int threshold) {
    FOR_EACH(i, n) keep[i] = mix32(((unsigned int)i + first) * 0x9E3779B1u + key) >= threshold;
}

// y = x * keep / (1 - rate), scale = 1 / (1 - rate); the same kernel serves the backward
template <typename T>
__global__ void dropout_apply(const T* x, const bool* keep, T* y, long long n, float scale) {
    FOR_EACH(i, n) y[i] = from_f32<T>(keep[i] ? to_f32(x[i]) * scale : 0.f);
}
