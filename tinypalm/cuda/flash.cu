// Causal attention in bfloat16 without the (rows, S) score matrix in device memory (FlashAttention-2's scheme):
// a warp computes the scores of its 16 query rows against a tile of keys on the tensor cores (mma.sync, bf16
// inputs, float32 accumulation), keeps them in registers, and uses them there as the left operand of the next
// product. ops.attention_forward / attention_backward are the twins.
//
// Layout, as the GEMM path in ops.py: q, out (BH, GT, DH) with a kv head's G query heads stacked along the rows,
// row r being query t = r % T at position first_pos + t; k, v (BH, S, DH); lse, delta (BH, GT) float32. Row r
// sees keys 0 .. first_pos + t. scale = 1/sqrt(DH) multiplies the scores.
//
// forward: one pass over the key tiles with a running row maximum m and sum l (the output rescaled by
// exp(m_old - m_new) when m grows); it keeps L = m + log l, the log-sum-exp of each row's scaled scores. The
// backward recomputes the probabilities p = exp(s - L) tile by tile:
//   dv = p^T dout,  dp = dout v^T,  ds = p (dp - delta) with delta = rowsum(dout * out),  dq = scale ds k,
//   dk = scale ds^T q.
// p and ds are rounded to bf16 as the left operands of their products.

#define KEYS 64              // keys per tile (a block's keys in flash_backward_dkdv: 4 warps x 16)
#define ROWS 64              // query rows per block in flash_forward and flash_backward_dq: 4 warps x 16
#define ROWS_DKV 32          // query rows per step of flash_backward_dkdv
#define LDS(DH) ((DH) + 8)   // row stride of a tile in shared memory: rows 16 bytes apart in the banks

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

// the largest t among rows row0 .. last (a tile may span two of the G stacked heads)
__device__ __forceinline__ int max_query(int row0, int last, int T) {
    return row0 / T != last / T ? T - 1 : last % T;
}

// rows row0 .. row0 + n - 1 of a (rows, DH) bf16 matrix into shared memory (row stride LDS(DH)), zeros from
// row_end on; 16-byte copies
template <int DH>
__device__ void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0, int n, int row_end) {
    const int per_row = DH / 8;
    for (int i = threadIdx.x; i < n * per_row; i += blockDim.x) {
        int r = i / per_row, c = i % per_row;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < row_end) x = reinterpret_cast<const uint4*>(src + (long long)(row0 + r) * DH)[c];
        reinterpret_cast<uint4*>(dst + r * LDS(DH))[c] = x;
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

// scale * acc (16 x DH) -> rows row0 + g, row0 + g + 8 of dst (., DH), those before row_end; T_OUT bf16 or float
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <int DH, typename T_OUT>
__device__ __forceinline__ void store_tile(const frag_acc (&acc)[DH / 16], float scale_a, float scale_b, T_OUT* dst,
                                           int row0, int row_end) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int d = 0; d < DH / 16; d++)
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
            const int r = row0 + g + ACC_ROW(i);
            const float sc = ACC_ROW(i) ? scale_b : scale_a;
            if (r < row_end)
                store_pair(dst + (long long)r * DH + d * 16 + ACC_COL(i, t), acc[d].x[i] * sc, acc[d].x[i + 1] * sc);
        }
}

// grid (ceil(GT / ROWS), BH), 128 threads; warp w owns rows row0 + 16w .. + 15, lane (g, t) = (lane / 4,
// lane % 4) the elements of rows g and g + 8 that the fragment layout gives it.
template <int DH>
__global__ void flash_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                              __nv_bfloat16* out, float* lse, int GT, int T, int S, int first_pos, float scale) {
    __shared__ __align__(16) __nv_bfloat16 qs[ROWS * LDS(DH)];
    __shared__ __align__(16) __nv_bfloat16 ks[KEYS * LDS(DH)];
    __shared__ __align__(16) __nv_bfloat16 vs[KEYS * LDS(DH)];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const long long bh = blockIdx.y;
    const int row0 = blockIdx.x * ROWS;
    q += bh * GT * DH; out += bh * GT * DH; lse += bh * GT;
    k += bh * S * DH; v += bh * S * DH;

    load_rows<DH>(qs, q, row0, ROWS, GT);
    __syncthreads();
    frag_a qf[DH / 16];
    load_left<DH>(qf, qs + warp * 16 * LDS(DH));
    const int rows = row0 + warp * 16;
    const int limit[2] = {key_limit(rows + g, GT, T, S, first_pos), key_limit(rows + g + 8, GT, T, S, first_pos)};
    const int last = min(row0 + ROWS, GT) - 1;
    const int tiles = min(S - 1, first_pos + max_query(row0, last, T)) / KEYS + 1;

    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};     // this lane's share of rows g, g + 8
    frag_acc o[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) fill(o[d]);
    for (int j = 0; j < tiles; j++) {
        __syncthreads();                                  // every warp is done with the last tile
        load_rows<DH>(ks, k, j * KEYS, KEYS, S);
        load_rows<DH>(vs, v, j * KEYS, KEYS, S);
        __syncthreads();
        frag_acc s[KEYS / 16];
        times_rows_t<DH, KEYS / 16>(s, qf, ks);
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < KEYS / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int h = ACC_ROW(i) ? 1 : 0;
                const bool seen = j * KEYS + n * 16 + ACC_COL(i, t) <= limit[h];
                s[n].x[i] = seen ? s[n].x[i] * scale : NEG_INF;
                tile_max[h] = fmaxf(tile_max[h], s[n].x[i]);
            }
        float alpha[2], new_m[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {                     // the four lanes of a row: t = 0 .. 3
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            new_m[h] = fmaxf(m[h], tile_max[h]);
            alpha[h] = new_m[h] == NEG_INF ? 1.f : expf(m[h] - new_m[h]);    // m = -inf: l and o are still 0
            l[h] *= alpha[h];
            m[h] = new_m[h];
        }
#pragma unroll
        for (int n = 0; n < KEYS / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int h = ACC_ROW(i) ? 1 : 0;
                s[n].x[i] = m[h] == NEG_INF ? 0.f : expf(s[n].x[i] - m[h]);   // masked: exp(-inf) = 0
                l[h] += s[n].x[i];
            }
#pragma unroll
        for (int d = 0; d < DH / 16; d++)
#pragma unroll
            for (int i = 0; i < 8; i++) o[d].x[i] *= alpha[ACC_ROW(i) ? 1 : 0];
        add_times_rows<DH, KEYS / 16>(o, s, vs);
    }
    float L[2], inv[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        L[h] = l[h] > 0.f ? m[h] + logf(l[h]) : 0.f;
        inv[h] = l[h] > 0.f ? 1.f / l[h] : 0.f;
    }
    store_tile<DH>(o, inv[0], inv[1], out, rows, GT);
    if (t == 0) {
        if (rows + g < GT) lse[rows + g] = L[0];
        if (rows + g + 8 < GT) lse[rows + g + 8] = L[1];
    }
}

// dq = scale sum over key tiles of ds k. grid (ceil(GT / ROWS), BH), 128 threads, rows shared out as in the forward.
template <int DH>
__global__ void flash_backward_dq(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                  const __nv_bfloat16* dout, const float* lse, const float* delta,
                                  __nv_bfloat16* dq, int GT, int T, int S, int first_pos, float scale) {
    __shared__ __align__(16) __nv_bfloat16 ks[KEYS * LDS(DH)];
    __shared__ __align__(16) __nv_bfloat16 vs[KEYS * LDS(DH)];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const long long bh = blockIdx.y;
    const int row0 = blockIdx.x * ROWS;
    q += bh * GT * DH; dout += bh * GT * DH; dq += bh * GT * DH; lse += bh * GT; delta += bh * GT;
    k += bh * S * DH; v += bh * S * DH;

    load_rows<DH>(ks, q, row0, ROWS, GT);              // ks, vs hold this block's q and dout rows first
    load_rows<DH>(vs, dout, row0, ROWS, GT);
    __syncthreads();
    frag_a qf[DH / 16], dof[DH / 16];
    load_left<DH>(qf, ks + warp * 16 * LDS(DH));
    load_left<DH>(dof, vs + warp * 16 * LDS(DH));
    const int rows = row0 + warp * 16;
    int limit[2];
    float L[2], D[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = rows + g + 8 * h;
        limit[h] = key_limit(r, GT, T, S, first_pos);
        L[h] = r < GT ? lse[r] : 0.f;
        D[h] = r < GT ? delta[r] : 0.f;
    }
    const int last = min(row0 + ROWS, GT) - 1;
    const int tiles = min(S - 1, first_pos + max_query(row0, last, T)) / KEYS + 1;

    frag_acc acc[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) fill(acc[d]);
    for (int j = 0; j < tiles; j++) {
        __syncthreads();
        load_rows<DH>(ks, k, j * KEYS, KEYS, S);
        load_rows<DH>(vs, v, j * KEYS, KEYS, S);
        __syncthreads();
        frag_acc s[KEYS / 16], dp[KEYS / 16];
        times_rows_t<DH, KEYS / 16>(s, qf, ks);           // scores
        times_rows_t<DH, KEYS / 16>(dp, dof, vs);         // dp = dout v^T
#pragma unroll
        for (int n = 0; n < KEYS / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {                 // ds, in place of the scores
                const int h = ACC_ROW(i) ? 1 : 0;
                const float p = j * KEYS + n * 16 + ACC_COL(i, t) <= limit[h] ? expf(s[n].x[i] * scale - L[h]) : 0.f;
                s[n].x[i] = p * (dp[n].x[i] - D[h]);
            }
        add_times_rows<DH, KEYS / 16>(acc, s, ks);
    }
    store_tile<DH>(acc, scale, scale, dq, rows, GT);
}

// dk, dv of one tile of KEYS keys from the query rows of one chunk: grid (ceil(S / KEYS), BH, chunks), 128
// threads, warp w owning keys key0 + 16w .. + 15. Chunk z covers rows z chunk_rows .. (z + 1) chunk_rows - 1
// (chunk_rows a multiple of ROWS_DKV) and writes its float32 partial sums to dk_part, dv_part (chunks, BH, S,
// DH); the caller adds the chunks up. Each step takes ROWS_DKV rows; a warp works on the transposes:
// s^T = k q^T and dp^T = v dout^T (its keys by the rows), p^T and ds^T in place, then dv += p^T dout and
// dk += ds^T q with those as left operands.
template <int DH>
__global__ void flash_backward_dkdv(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                    const __nv_bfloat16* dout, const float* lse, const float* delta,
                                    float* dk_part, float* dv_part, int GT, int T, int S, int first_pos,
                                    float scale, int chunk_rows) {
    __shared__ __align__(16) __nv_bfloat16 tile_a[KEYS * LDS(DH)];      // k, then the steps' q rows
    __shared__ __align__(16) __nv_bfloat16 tile_b[KEYS * LDS(DH)];      // v, then the steps' dout rows
    __shared__ float row_lse[ROWS_DKV], row_delta[ROWS_DKV];
    __shared__ int row_limit[ROWS_DKV];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const long long bh = blockIdx.y;
    const int key0 = blockIdx.x * KEYS, my_keys = key0 + warp * 16;
    const int first_row = blockIdx.z * chunk_rows, row_end = min(GT, first_row + chunk_rows);
    q += bh * GT * DH; dout += bh * GT * DH; lse += bh * GT; delta += bh * GT;
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

    for (int row0 = first_row; row0 < row_end; row0 += ROWS_DKV) {
        const int last = min(row0 + ROWS_DKV, row_end) - 1;
        if (first_pos + max_query(row0, last, T) < key0) continue;   // no row here sees these keys
        __syncthreads();                                  // every warp is done with the last rows (or k and v)
        load_rows<DH>(tile_a, q, row0, ROWS_DKV, row_end);
        load_rows<DH>(tile_b, dout, row0, ROWS_DKV, row_end);
        if (threadIdx.x < ROWS_DKV) {
            const int r = row0 + threadIdx.x;
            row_lse[threadIdx.x] = r < row_end ? lse[r] : 0.f;
            row_delta[threadIdx.x] = r < row_end ? delta[r] : 0.f;
            row_limit[threadIdx.x] = key_limit(r, row_end, T, S, first_pos);
        }
        __syncthreads();
        frag_acc st[ROWS_DKV / 16], dpt[ROWS_DKV / 16];
        times_rows_t<DH, ROWS_DKV / 16>(st, kf, tile_a);     // s^T (16 keys x ROWS_DKV rows)
        times_rows_t<DH, ROWS_DKV / 16>(dpt, vf, tile_b);    // dp^T
        frag_acc dst[ROWS_DKV / 16];
#pragma unroll
        for (int n = 0; n < ROWS_DKV / 16; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int r = n * 16 + ACC_COL(i, t);                 // the row, within the step
                const float p = key_of[ACC_ROW(i) ? 1 : 0] <= row_limit[r]
                                ? expf(st[n].x[i] * scale - row_lse[r]) : 0.f;
                st[n].x[i] = p;
                dst[n].x[i] = p * (dpt[n].x[i] - row_delta[r]);
            }
        add_times_rows<DH, ROWS_DKV / 16>(dv, st, tile_b);       // dv += p^T dout
        add_times_rows<DH, ROWS_DKV / 16>(dk, dst, tile_a);      // dk += ds^T q
    }
    store_tile<DH>(dk, scale, scale, dk_part, my_keys, S);
    store_tile<DH>(dv, 1.f, 1.f, dv_part, my_keys, S);
}
