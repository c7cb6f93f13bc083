// Rows of bytes from one strided matrix to another, U at a time (ops.concat_columns puts each part of a
// concatenation in its columns of the result this way). U is a 16-, 4- or 2-byte unit: the caller picks the
// widest that the row's bytes, both strides and both starts are multiples of. CuPy's own copy moves one element
// per thread, 2 bytes in bf16.
//
// src: rows of row_bytes, src_stride bytes apart; dst: the same rows, dst_stride bytes apart.
template <typename U>
__global__ void copy_rows(const void* src, long long src_stride, void* dst, long long dst_stride, long long rows,
                          long long row_bytes) {
    const long long per_row = row_bytes / (long long)sizeof(U);
    FOR_EACH(i, rows * per_row) {
        const long long r = i / per_row, c = i % per_row;
        reinterpret_cast<U*>(static_cast<char*>(dst) + r * dst_stride)[c] =
            reinterpret_cast<const U*>(static_cast<const char*>(src) + r * src_stride)[c];
    }
}
