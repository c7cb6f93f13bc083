// Causal attention in bfloat16 without the (rows, S) score matrix in device memory (FlashAttention-2's scheme):
// a warp computes the scores of its 16 query rows against a tile of keys on the tensor cores (mma.sync, bf16
// inputs, float32 accumulation), keeps them in registers, and uses them there as the left operand of the next
// product. ops.attention_forward / attention_backward are the twins.
//
// Layout: a block works on one (batch, kv head) pair bh = b Hkv + kv and its G = H / Hkv query heads, their T
// queries each stacked into GT = G T rows as in ops.py, row r being query t = r % T (at position first_pos + t) of
// head kv G + r / T. q, out and dq stay (B, T, H, DH) (token_rows finds a row there); k, v and the stacked dout
// are (BH, S or GT, DH); lse, delta (BH, GT) float32. Row r sees keys 0 .. first_pos + t. scale = 1/sqrt(DH)
// multiplies the scores.
//
// forward: one pass over the key tiles with a running row maximum m and sum l (the output rescaled by
// exp(m_old - m_new) when m grows); it keeps L = m + log l, the log-sum-exp of each row's scaled scores. The
// backward recomputes the probabilities p = exp(s - L) tile by tile:
//   dv = p^T dout,  dp = dout v^T,  ds = p (dp - delta) with delta = rowsum(dout * out),  dq = scale ds k,
//   dk = scale ds^T q.
// p and ds are rounded to bf16 as the left operands of their products. Inside the kernels the scores are in
// log2 units (scale log2(e) s), so that every exponential is one exp2; lse is kept in natural units.
// Only the tiles that cross a row's causal limit are masked. Tiles reach shared memory through cp.async, two
// buffers each: the next tile (of keys, or of dk/dv's query rows) is on its way while the block works on this one.

#define KEYS 64              // keys per tile (a block's keys in flash_backward_dkdv: 4 warps x 16)
#define ROWS 64              // query rows per block in flash_forward and flash_backward_dq: 4 warps x 16
#define ROWS_DKV 32          // query rows per step of flash_backward_dkdv
#define LDS(DH) ((DH) + 8)   // row stride of a tile in shared memory: rows 16 bytes apart in the banks
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// --- 16 x 16 tiles on the tensor cores: mma.sync.m16n8k16 (bf16 in, float32 accumulate), twice ---------------
// A lane's registers hold fixed elements (PTX ISA, "Matrix Fragments for mma.m16n8k16"); with g = lane / 4 and
// t = lane % 4: A's four words are rows g, g + 8 by column pairs 2t, 2t + 8; B's two words per 8-column half are
// rows 2t, 2t + 8 (each with the next row) of column g; C's four floats per half are (g, 2t), (g, 2t + 1),
// (g + 8, 2t), (g + 8, 2t + 1).

struct frag_a { unsigned x[4]; };     // a 16 x 16 bf16 left operand
struct frag_b { unsigned x[4]; };     // a 16 x 16 bf16 right operand: x[0], x[1] columns 0-7, x[2], x[3] 8-15
struct frag_acc { float x[8]; };      // a 16 x 16 float32 product: x[0..3] columns 0-7, x[4..7] columns 8-15

// Fragments from shared memory with ldmatrix: lanes 8i .. 8i + 7 give the addresses of the 8 rows (16 bytes each)
// of 8 x 8 block i, and every lane receives its elements of the four blocks (.trans: of their transposes).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const __nv_bfloat16* row, bool trans) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// A[i][j] = p[i * ld + j]: blocks (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
__device__ __forceinline__ void load_a(frag_a& f, const __nv_bfloat16* p, int ld) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    ldmatrix_x4(f.x, p + ((i & 1) * 8 + r) * ld + (i >> 1) * 8, false);
}

// B[k][n] = p[k * ld + n]: the transposes of blocks (k 0-7, n 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
__device__ __forceinline__ void load_b(frag_b& f, const __nv_bfloat16* p, int ld) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    ldmatrix_x4(f.x, p + ((i & 1) * 8 + r) * ld + (i >> 1) * 8, true);
}

// B[k][n] = p[n * ld + k] (the transpose of a row-major tile: q k^T reads k's rows so): blocks (n 0-7, k 0-7),
// (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) of the stored tile
__device__ __forceinline__ void load_b_t(frag_b& f, const __nv_bfloat16* p, int ld) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    ldmatrix_x4(f.x, p + ((i >> 1) * 8 + r) * ld + (i & 1) * 8, false);
}

__device__ __forceinline__ void fill(frag_acc& c) {
#pragma unroll
    for (int i = 0; i < 8; i++) c.x[i] = 0.f;
}

// c += a b
__device__ __forceinline__ void mma(frag_acc& c, const frag_a& a, const frag_b& b) {
#pragma unroll
    for (int h = 0; h < 2; h++)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c.x[4 * h]), "+f"(c.x[4 * h + 1]), "+f"(c.x[4 * h + 2]), "+f"(c.x[4 * h + 3])
                     : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[2 * h]), "r"(b.x[2 * h + 1]));
}

// --- attention ------------------------------------------------------------------------------------------------

// the last key row `row` may see; -1 for rows past the end (padding: they see nothing)
__device__ __forceinline__ int key_limit(int row, int row_end, int T, int S, int first_pos) {
    return row < row_end ? min(S - 1, first_pos + row % T) : -1;
}

// the largest and the smallest t among rows row0 .. last (a tile may span two of the G stacked heads)
__device__ __forceinline__ int max_query(int row0, int last, int T) {
    return row0 / T != last / T ? T - 1 : last % T;
}
__device__ __forceinline__ int min_query(int row0, int last, int T) {
    return row0 / T != last / T ? 0 : row0 % T;
}

// the last key that every one of rows row0 .. row0 + n - 1 sees (-1 when one is padding): keys up to it need no mask
__device__ __forceinline__ int common_limit(int row0, int n, int row_end, int T, int S, int first_pos) {
    return row0 + n > row_end ? -1 : min(S - 1, first_pos + min_query(row0, row0 + n - 1, T));
}

// Where row r of a block lies, in elements from its first row: one after another (packed_rows: k, v, the
// stacked dout, the dk/dv partials), or token r % T of the block's head r / T in a (B, T, H, DH) array, from the
// block's first head (token_rows: q, out, dq)
struct packed_rows {
    int dh;
    __device__ __forceinline__ long long operator()(int r) const { return (long long)r * dh; }
};
struct token_rows {
    int T, H, dh;
    __device__ __forceinline__ long long operator()(int r) const { return ((long long)(r % T) * H + r / T) * dh; }
};

// where block bh's first query head starts in a (B, T, H, DH) array: token 0 of head kv G, batch b
__device__ __forceinline__ long long first_head(long long bh, int Hkv, int G, int T, int DH) {
    return (bh / Hkv * T * Hkv * G + bh % Hkv * G) * DH;
}

// rows row0 .. row0 + n - 1 of a bf16 matrix with DH columns into shared memory (row stride LDS(DH)), zeros
// from row_end on; 16-byte copies
template <int DH, typename Rows>
__device__ void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0, int n, int row_end, Rows at) {
    const int per_row = DH / 8;
    for (int i = threadIdx.x; i < n * per_row; i += blockDim.x) {
        int r = i / per_row, c = i % per_row;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < row_end) x = reinterpret_cast<const uint4*>(src + at(row0 + r))[c];
        reinterpret_cast<uint4*>(dst + r * LDS(DH))[c] = x;
    }
}
template <int DH>
__device__ void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0, int n, int row_end) {
    load_rows<DH>(dst, src, row0, n, row_end, packed_rows{DH});
}

// the same, asynchronously (cp.async, 16 bytes a copy, zeros from row_end on): the copies of one commit group
// have landed once cp.async.wait_group lets the thread go on, and every thread's once the block synchronises
template <int DH, typename Rows>
__device__ void fetch_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0, int n, int row_end, Rows at) {
    const int per_row = DH / 8;
    for (int i = threadIdx.x; i < n * per_row; i += blockDim.x) {
        const int r = i / per_row, c = i % per_row;
        const bool inside = row0 + r < row_end;
        const __nv_bfloat16* from = src + at(inside ? row0 + r : 0) + c * 8;
        const unsigned to = (unsigned)__cvta_generic_to_shared(dst + r * LDS(DH) + c * 8);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(to), "l"(from), "r"(inside ? 16 : 0));
    }
}
template <int DH>
__device__ void fetch_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0, int n, int row_end) {
    fetch_rows<DH>(dst, src, row0, n, row_end, packed_rows{DH});
}

// Key tiles in two buffers of KEYS rows each (ks, vs): while the block works on tile j (buffer j & 1), tile j + 1
// comes into the other. Every thread calls it at the top of iteration j, after a __syncthreads (no warp still
// reads buffer (j + 1) & 1) and before one (then tile j is there for all). first_key_tile starts tile 0.
template <int DH>
__device__ __forceinline__ void first_key_tile(__nv_bfloat16* ks, __nv_bfloat16* vs, const __nv_bfloat16* k,
                                               const __nv_bfloat16* v, int S) {
    fetch_rows<DH>(ks, k, 0, KEYS, S);
    fetch_rows<DH>(vs, v, 0, KEYS, S);
    asm volatile("cp.async.commit_group;");
}
template <int DH>
__device__ __forceinline__ void next_key_tile(__nv_bfloat16* ks, __nv_bfloat16* vs, const __nv_bfloat16* k,
                                              const __nv_bfloat16* v, int j, int tiles, int S) {
    if (j + 1 < tiles) {
        const int next = ((j + 1) & 1) * KEYS * LDS(DH);
        fetch_rows<DH>(ks + next, k, (j + 1) * KEYS, KEYS, S);
        fetch_rows<DH>(vs + next, v, (j + 1) * KEYS, KEYS, S);
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;" ::: "memory");   // tile j is in; tile j + 1 may still be on its way
    } else {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
}

// a product's 16 x 16 tile n as the left operand (16 x 16, k = its columns) of the next product: the C layout
// of two m16n8 halves is the A layout of m16n8k16, so no data moves between lanes
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ void as_left(frag_a& a, const frag_acc& c) {
    a.x[0] = bf16_pair(c.x[0], c.x[1]);
    a.x[1] = bf16_pair(c.x[2], c.x[3]);
    a.x[2] = bf16_pair(c.x[4], c.x[5]);
    a.x[3] = bf16_pair(c.x[6], c.x[7]);
}

// element i of a lane's frag_acc: row g (+ 8 when i & 2), column 8 (i >> 2) + 2t + (i & 1)
#define ACC_ROW(i) (((i) & 2) ? 8 : 0)
#define ACC_COL(i, t) (8 * ((i) >> 2) + 2 * (t) + ((i) & 1))

// -inf for the scores s[n] (16 x 16 each, columns key0 + 16n ..) past their row's limit (limit[0]: row g,
// limit[1]: row g + 8)
template <int N>
__device__ __forceinline__ void mask_past(frag_acc (&s)[N], int key0, const int (&limit)[2]) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (key0 + n * 16 + ACC_COL(i, t) > limit[ACC_ROW(i) ? 1 : 0]) s[n].x[i] = NEG_INF;
}

// s[n] (16 x 16 each, n < N) = a (16 x DH, left operands) times rows 16n .. 16n + 15 of b^T, b (., DH) in
// shared memory with row stride LDS(DH)
template <int DH, int N>
__device__ __forceinline__ void times_rows_t(frag_acc (&s)[N], const frag_a (&a)[DH / 16], const __nv_bfloat16* b) {
#pragma unroll
    for (int n = 0; n < N; n++) {
        fill(s[n]);
#pragma unroll
        for (int d = 0; d < DH / 16; d++) {
            frag_b bf;
            load_b_t(bf, b + n * 16 * LDS(DH) + d * 16, LDS(DH));
            mma(s[n], a[d], bf);
        }
    }
}

// acc (16 x DH) += p (16 x 16N, in registers as N product tiles) times b (16N x DH, shared memory)
template <int DH, int N>
__device__ __forceinline__ void add_times_rows(frag_acc (&acc)[DH / 16], const frag_acc (&p)[N],
                                               const __nv_bfloat16* b) {
#pragma unroll
    for (int kk = 0; kk < N; kk++) {
        frag_a pa;
        as_left(pa, p[kk]);
#pragma unroll
        for (int d = 0; d < DH / 16; d++) {
            frag_b bf;
            load_b(bf, b + kk * 16 * LDS(DH) + d * 16, LDS(DH));
            mma(acc[d], pa, bf);
        }
    }
}

// the warp's 16 x 16 tiles of a (16 x DH) block as left operands, from shared memory
template <int DH>
__device__ __forceinline__ void load_left(frag_a (&a)[DH / 16], const __nv_bfloat16* src) {
#pragma unroll
    for (int d = 0; d < DH / 16; d++) load_a(a[d], src + d * 16, LDS(DH));
}

// scale * acc (16 x DH) -> rows row0 + g, row0 + g + 8 of dst (placed by `at`), those before row_end; T_OUT bf16
// or float
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <int DH, typename T_OUT, typename Rows>
__device__ __forceinline__ void store_tile(const frag_acc (&acc)[DH / 16], float scale_a, float scale_b, T_OUT* dst,
                                           int row0, int row_end, Rows at) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int d = 0; d < DH / 16; d++)
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
            const int r = row0 + g + ACC_ROW(i);
            const float sc = ACC_ROW(i) ? scale_b : scale_a;
            if (r < row_end)
                store_pair(dst + at(r) + d * 16 + ACC_COL(i, t), acc[d].x[i] * sc, acc[d].x[i + 1] * sc);
        }
}

// grid (ceil(GT / ROWS), BH), 128 threads; warp w owns rows row0 + 16w .. + 15, lane (g, t) = (lane / 4,
// lane % 4) the elements of rows g and g + 8 that the fragment layout gives it.
template <int DH>
__global__ void __launch_bounds__(128, 4)    // at most 128 registers: four blocks on a multiprocessor
flash_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
              int GT, int T, int S, int first_pos, int Hkv, float scale) {
    __shared__ __align__(16) __nv_bfloat16 qs[ROWS * LDS(DH)];
    __shared__ __align__(16) __nv_bfloat16 ks[2 * KEYS * LDS(DH)];     // two key tiles (next_key_tile)
    __shared__ __align__(16) __nv_bfloat16 vs[2 * KEYS * LDS(DH)];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const long long bh = blockIdx.y;
    const int row0 = blockIdx.x * ROWS, G = GT / T;
    const token_rows q_rows = {T, Hkv * G, DH};
    const long long heads = first_head(bh, Hkv, G, T, DH);
    q += heads; out += heads; lse += bh * GT;
    k += bh * S * DH; v += bh * S * DH;

    first_key_tile<DH>(ks, vs, k, v, S);
    load_rows<DH>(qs, q, row0, ROWS, GT, q_rows);
    __syncthreads();
    frag_a qf[DH / 16];
    load_left<DH>(qf, qs + warp * 16 * LDS(DH));
    const int rows = row0 + warp * 16;
    const int limit[2] = {key_limit(rows + g, GT, T, S, first_pos), key_limit(rows + g + 8, GT, T, S, first_pos)};
    const int unmasked = common_limit(rows, 16, GT, T, S, first_pos);
    const int last = min(row0 + ROWS, GT) - 1;
    const int tiles = min(S - 1, first_pos + max_query(row0, last, T)) / KEYS + 1;
    const float scale2 = scale * LOG2E;

    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};     // this lane's share of rows g, g + 8 (log2 units)
    frag_acc o[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) fill(o[d]);
    for (int j = 0; j < tiles; j++) {
        __syncthreads();                                  // every warp is done with tile j - 1
        next_key_tile<DH>(ks, vs, k, v, j, tiles, S);
        __syncthreads();
        const __nv_bfloat16 *kt = ks + (j & 1) * KEYS * LDS(DH), *vt = vs + (j & 1) * KEYS * LDS(DH);
        frag_acc s[KEYS / 16];
        times_rows_t<DH, KEYS / 16>(s, qf, kt);
        if (j * KEYS + KEYS - 1 > unmasked) mask_past<KEYS / 16>(s, j * KEYS, limit);
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < KEYS / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int h = ACC_ROW(i) ? 1 : 0;
                s[n].x[i] *= scale2;
                tile_max[h] = fmaxf(tile_max[h], s[n].x[i]);
            }
        float alpha[2], new_m[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {                     // the four lanes of a row: t = 0 .. 3
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            new_m[h] = fmaxf(m[h], tile_max[h]);
            alpha[h] = new_m[h] == NEG_INF ? 1.f : exp2f(m[h] - new_m[h]);   // m = -inf: l and o are still 0
            l[h] *= alpha[h];
            m[h] = new_m[h];
        }
#pragma unroll
        for (int n = 0; n < KEYS / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int h = ACC_ROW(i) ? 1 : 0;
                s[n].x[i] = m[h] == NEG_INF ? 0.f : exp2f(s[n].x[i] - m[h]);  // masked: exp2(-inf) = 0
                l[h] += s[n].x[i];
            }
#pragma unroll
        for (int d = 0; d < DH / 16; d++)
#pragma unroll
            for (int i = 0; i < 8; i++) o[d].x[i] *= alpha[ACC_ROW(i) ? 1 : 0];
        add_times_rows<DH, KEYS / 16>(o, s, vt);
    }
    float L[2], inv[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        L[h] = l[h] > 0.f ? (m[h] + log2f(l[h])) * LN2 : 0.f;
        inv[h] = l[h] > 0.f ? 1.f / l[h] : 0.f;
    }
    store_tile<DH>(o, inv[0], inv[1], out, rows, GT, q_rows);
    if (t == 0) {
        if (rows + g < GT) lse[rows + g] = L[0];
        if (rows + g + 8 < GT) lse[rows + g + 8] = L[1];
    }
}

// dq = scale sum over key tiles of ds k. grid (ceil(GT / ROWS), BH), 128 threads, rows shared out as in the forward.
template <int DH>
__global__ void flash_backward_dq(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                  const __nv_bfloat16* dout, const float* lse, const float* delta,
                                  __nv_bfloat16* dq, int GT, int T, int S, int first_pos, int Hkv, float scale) {
    __shared__ __align__(16) __nv_bfloat16 ks[2 * KEYS * LDS(DH)];     // two key tiles (next_key_tile)
    __shared__ __align__(16) __nv_bfloat16 vs[2 * KEYS * LDS(DH)];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const long long bh = blockIdx.y;
    const int row0 = blockIdx.x * ROWS, G = GT / T;
    const token_rows q_rows = {T, Hkv * G, DH};
    const long long heads = first_head(bh, Hkv, G, T, DH);
    q += heads; dq += heads; dout += bh * GT * DH; lse += bh * GT; delta += bh * GT;
    k += bh * S * DH; v += bh * S * DH;

    first_key_tile<DH>(ks, vs, k, v, S);
    __nv_bfloat16 *qs = ks + KEYS * LDS(DH), *dos = vs + KEYS * LDS(DH);   // the second buffers hold this block's
    load_rows<DH>(qs, q, row0, ROWS, GT, q_rows);                           // q and dout rows first
    load_rows<DH>(dos, dout, row0, ROWS, GT);
    __syncthreads();
    frag_a qf[DH / 16], dof[DH / 16];
    load_left<DH>(qf, qs + warp * 16 * LDS(DH));
    load_left<DH>(dof, dos + warp * 16 * LDS(DH));
    const int rows = row0 + warp * 16;
    int limit[2];
    float L2[2], D[2];                                    // log2 e lse, delta
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = rows + g + 8 * h;
        limit[h] = key_limit(r, GT, T, S, first_pos);
        L2[h] = r < GT ? lse[r] * LOG2E : 0.f;
        D[h] = r < GT ? delta[r] : 0.f;
    }
    const int unmasked = common_limit(rows, 16, GT, T, S, first_pos);
    const float scale2 = scale * LOG2E;
    const int last = min(row0 + ROWS, GT) - 1;
    const int tiles = min(S - 1, first_pos + max_query(row0, last, T)) / KEYS + 1;

    frag_acc acc[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) fill(acc[d]);
    for (int j = 0; j < tiles; j++) {
        __syncthreads();
        next_key_tile<DH>(ks, vs, k, v, j, tiles, S);
        __syncthreads();
        const __nv_bfloat16 *kt = ks + (j & 1) * KEYS * LDS(DH), *vt = vs + (j & 1) * KEYS * LDS(DH);
        frag_acc s[KEYS / 16], dp[KEYS / 16];
        times_rows_t<DH, KEYS / 16>(s, qf, kt);           // scores
        times_rows_t<DH, KEYS / 16>(dp, dof, vt);         // dp = dout v^T
        if (j * KEYS + KEYS - 1 > unmasked) mask_past<KEYS / 16>(s, j * KEYS, limit);
#pragma unroll
        for (int n = 0; n < KEYS / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {                 // ds, in place of the scores
                const int h = ACC_ROW(i) ? 1 : 0;
                const float p = exp2f(s[n].x[i] * scale2 - L2[h]);          // masked: exp2(-inf) = 0
                s[n].x[i] = p * (dp[n].x[i] - D[h]);
            }
        add_times_rows<DH, KEYS / 16>(acc, s, kt);
    }
    store_tile<DH>(acc, scale, scale, dq, rows, GT, q_rows);
}

// the first step of ROWS_DKV rows, from row0 on, in which a row sees a key from key0 on (row_end when none)
__device__ __forceinline__ int next_step(int row0, int row_end, int key0, int T, int first_pos) {
    for (; row0 < row_end; row0 += ROWS_DKV)
        if (first_pos + max_query(row0, min(row0 + ROWS_DKV, row_end) - 1, T) >= key0) break;
    return row0;
}

// a step's rows: q and dout (ROWS_DKV each, with cp.async, as one commit group), and their lse (log2 units),
// delta and key limits
template <int DH>
__device__ __forceinline__ void step_rows(__nv_bfloat16* qs, __nv_bfloat16* dos, float* s_lse, float* s_delta,
                                          int* s_limit, const __nv_bfloat16* q, token_rows q_rows,
                                          const __nv_bfloat16* dout, const float* lse, const float* delta, int row0,
                                          int row_end, int T, int S, int first_pos) {
    fetch_rows<DH>(qs, q, row0, ROWS_DKV, row_end, q_rows);
    fetch_rows<DH>(dos, dout, row0, ROWS_DKV, row_end);
    asm volatile("cp.async.commit_group;");
    if (threadIdx.x < ROWS_DKV) {
        const int r = row0 + threadIdx.x;
        s_lse[threadIdx.x] = r < row_end ? lse[r] * LOG2E : 0.f;
        s_delta[threadIdx.x] = r < row_end ? delta[r] : 0.f;
        s_limit[threadIdx.x] = key_limit(r, row_end, T, S, first_pos);
    }
}

// dk, dv of one tile of KEYS keys from the query rows of one chunk: grid (ceil(S / KEYS), BH, chunks), 128
// threads, warp w owning keys key0 + 16w .. + 15. Chunk z covers rows z chunk_rows .. (z + 1) chunk_rows - 1
// (chunk_rows a multiple of ROWS_DKV) and writes its float32 partial sums to dk_part, dv_part (chunks, BH, S,
// DH); the caller adds the chunks up. Each step takes ROWS_DKV rows, the next step's rows on their way into the
// other half of the buffers meanwhile; a warp works on the transposes: s^T = k q^T and dp^T = v dout^T (its keys
// by the rows), p^T and ds^T in place, then dv += p^T dout and dk += ds^T q with those as left operands.
template <int DH>
__global__ void flash_backward_dkdv(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                    const __nv_bfloat16* dout, const float* lse, const float* delta,
                                    float* dk_part, float* dv_part, int GT, int T, int S, int first_pos, int Hkv,
                                    float scale, int chunk_rows) {
    static_assert(2 * ROWS_DKV <= KEYS, "two steps of rows fit where the keys were");
    __shared__ __align__(16) __nv_bfloat16 tile_a[KEYS * LDS(DH)];      // k, then two steps' q rows
    __shared__ __align__(16) __nv_bfloat16 tile_b[KEYS * LDS(DH)];      // v, then two steps' dout rows
    __shared__ float row_lse[2][ROWS_DKV], row_delta[2][ROWS_DKV];
    __shared__ int row_limit[2][ROWS_DKV];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const long long bh = blockIdx.y;
    const int key0 = blockIdx.x * KEYS, my_keys = key0 + warp * 16, G = GT / T;
    const int first_row = blockIdx.z * chunk_rows, row_end = min(GT, first_row + chunk_rows);
    const token_rows q_rows = {T, Hkv * G, DH};
    q += first_head(bh, Hkv, G, T, DH);
    dout += bh * GT * DH; lse += bh * GT; delta += bh * GT;
    k += bh * S * DH; v += bh * S * DH;
    const long long part = ((long long)blockIdx.z * gridDim.y + bh) * S * DH;
    dk_part += part; dv_part += part;

    load_rows<DH>(tile_a, k, key0, KEYS, S);
    load_rows<DH>(tile_b, v, key0, KEYS, S);
    __syncthreads();
    frag_a kf[DH / 16], vf[DH / 16];
    load_left<DH>(kf, tile_a + warp * 16 * LDS(DH));
    load_left<DH>(vf, tile_b + warp * 16 * LDS(DH));
    frag_acc dk[DH / 16], dv[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) {
        fill(dk[d]);
        fill(dv[d]);
    }
    const int key_of[2] = {my_keys + g, my_keys + g + 8};
    const float scale2 = scale * LOG2E;
#define STEP_ROWS(b, row0) step_rows<DH>(tile_a + (b) * ROWS_DKV * LDS(DH), tile_b + (b) * ROWS_DKV * LDS(DH), \
                                         row_lse[b], row_delta[b], row_limit[b], q, q_rows, dout, lse, delta, row0, \
                                         row_end, T, S, first_pos)

    int row0 = next_step(first_row, row_end, key0, T, first_pos);
    __syncthreads();                                      // every warp has its k and v
    if (row0 < row_end) STEP_ROWS(0, row0);
    for (int b = 0; row0 < row_end; b ^= 1) {
        const int next = next_step(row0 + ROWS_DKV, row_end, key0, T, first_pos);
        __syncthreads();                                  // no warp still reads buffer b ^ 1 (or k and v)
        if (next < row_end) {
            STEP_ROWS(b ^ 1, next);
            asm volatile("cp.async.wait_group 1;" ::: "memory");   // this step's rows are in
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
        const __nv_bfloat16 *qs = tile_a + b * ROWS_DKV * LDS(DH), *dos = tile_b + b * ROWS_DKV * LDS(DH);
        frag_acc st[ROWS_DKV / 16], dpt[ROWS_DKV / 16];
        times_rows_t<DH, ROWS_DKV / 16>(st, kf, qs);         // s^T (16 keys x ROWS_DKV rows)
        times_rows_t<DH, ROWS_DKV / 16>(dpt, vf, dos);       // dp^T
        frag_acc dst[ROWS_DKV / 16];
        const bool masked = my_keys + 15 > common_limit(row0, ROWS_DKV, row_end, T, S, first_pos);
#pragma unroll
        for (int n = 0; n < ROWS_DKV / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int r = n * 16 + ACC_COL(i, t);                 // the row, within the step
                float p = exp2f(st[n].x[i] * scale2 - row_lse[b][r]);
                if (masked && key_of[ACC_ROW(i) ? 1 : 0] > row_limit[b][r]) p = 0.f;
                st[n].x[i] = p;
                dst[n].x[i] = p * (dpt[n].x[i] - row_delta[b][r]);
            }
        add_times_rows<DH, ROWS_DKV / 16>(dv, st, dos);          // dv += p^T dout
        add_times_rows<DH, ROWS_DKV / 16>(dk, dst, qs);          // dk += ds^T q
        row0 = next;
    }
#undef STEP_ROWS
    store_tile<DH>(dk, scale, scale, dk_part, my_keys, S, packed_rows{DH});
    store_tile<DH>(dv, 1.f, 1.f, dv_part, my_keys, S, packed_rows{DH});
}

// Before the backward kernels: dout (B, T, H, DH), its tokens `token` elements apart (the model passes a column slice
// of a wider gradient), stacked into dout_g (BH, GT, DH), and delta = rowsum(dout * out) (BH, GT) in float32, out
// being the forward's (B, T, H, DH).
// One warp per stacked row r = (b Hkv + kv head) GT + g T + t, which is token t of head kv G + g: grid
// (ceil(rows / 4)), 128 threads.
template <int DH>
__global__ void flash_backward_prep(const __nv_bfloat16* dout, long long token, const __nv_bfloat16* out,
                                    __nv_bfloat16* dout_g, float* delta, int rows, int T, int Hkv, int G) {
    const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;                              // the whole warp
    const int t = row % T, bh = row / (G * T);
    const int head = (bh % Hkv) * G + row / T % G;
    const long long token0 = (long long)(bh / Hkv) * T + t;
    const __nv_bfloat16* src = dout + token0 * token + (long long)head * DH;
    const __nv_bfloat16* o = out + (token0 * Hkv * G + head) * DH;
    float sum = 0.f;
    for (int d = lane; d < DH; d += 32) {
        const __nv_bfloat16 x = src[d];
        dout_g[(long long)row * DH + d] = x;
        sum += __bfloat162float(x) * __bfloat162float(o[d]);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) delta[row] = sum;
}

// After flash_backward_dkdv: dk, dv (B, S, Hkv, DH) in bf16, each the sum of its chunks' float32 partials
// (chunks, BH, S, DH) taken in chunk order. Grid-stride over the n = BH S DH elements of one chunk.
__global__ void flash_sum_chunks(const float* dk_part, const float* dv_part, __nv_bfloat16* dk, __nv_bfloat16* dv,
                                 int chunks, long long n, int S, int Hkv, int DH) {
    FOR_EACH(i, n) {
        float sum_k = 0.f, sum_v = 0.f;
        for (int z = 0; z < chunks; z++) {
            sum_k += dk_part[z * n + i];
            sum_v += dv_part[z * n + i];
        }
        const long long d = i % DH, s = i / DH % S, bh = i / ((long long)DH * S);
        const long long at = ((bh / Hkv * S + s) * Hkv + bh % Hkv) * DH + d;
        dk[at] = __float2bfloat16_rn(sum_k);
        dv[at] = __float2bfloat16_rn(sum_v);
    }
}
