// Rotary position embedding (rotate-half), twin of ops.rope_forward / ops.rope_backward.
// x, out: N token rows (row stride ld_x / Dh*n_heads for out), each n_heads vectors of Dh; token row r sits at
// position r % T. cos, sin (T, Dh) of type C. One thread per (token, head, j < Dh/2) pair of elements j, j + Dh/2.
//   forward:  out_j = x_j cos_j - x_{j+h} sin_j          out_{j+h} = x_{j+h} cos_{j+h} + x_j sin_{j+h}
//   backward: dx_j  = d_j cos_j + d_{j+h} sin_{j+h}      dx_{j+h}  = d_{j+h} cos_{j+h} - d_j sin_j
template <typename T, typename C>
__global__ void rope(const T* x, const C* cos, const C* sin, T* out, long long n_pairs, int T_, int n_heads, int Dh,
                     long long ld_x, int backward) {
    int h = Dh / 2;
    FOR_EACH(i, n_pairs) {
        int j = (int)(i % h);
        long long vec = i / h;                         // (token, head)
        long long token = vec / n_heads;
        int head = (int)(vec % n_heads);
        int t = (int)(token % T_);
        const T* xv = x + token * ld_x + (long long)head * Dh;
        T* ov = out + vec * Dh;
        float a = to_f32(xv[j]), b = to_f32(xv[j + h]);
        float c1 = to_f32(cos[t * Dh + j]), c2 = to_f32(cos[t * Dh + j + h]);
        float s1 = to_f32(sin[t * Dh + j]), s2 = to_f32(sin[t * Dh + j + h]);
        if (backward) {
            ov[j] = from_f32<T>(a * c1 + b * s2);
            ov[j + h] = from_f32<T>(b * c2 - a * s1);
        } else {
            ov[j] = from_f32<T>(a * c1 - b * s1);
            ov[j + h] = from_f32<T>(b * c2 + a * s2);
        }
    }
}
