// Per-row QNT8 quantise and dequantise for TENSOR_QNT8 bodies with row_qnt (xcp, feature
// `cuda`). The bytes are those of src/codec/tensor.rs, bit for bit:
//
//   each row: its scale as a little-endian f32 (XCP_QNT8_SCALE_BYTES), then one byte per value;
//   scale = max|x| / 127 (XCP_QNT8_LEVELS); an all-zero row gets scale 1.0 and bytes 128;
//   q = round_ties_even(x / scale) + 128 (XCP_QNT8_ZERO), computed as the CPU does:
//     normal scale:    bits(x * (1 / scale) + XCP_QNT8_ROUND_MAGIC) & 0xff, with every
//                      operation rounded on its own (no fused multiply-add: __fmul_rn,
//                      __fadd_rn), so the magic-number addition rounds ties to even;
//     subnormal scale: the scale is (f32)((f64)max / 127) (at least the smallest subnormal)
//                      and q = clamp(rint((f64)x / scale) + 128, 0, 255) in f64;
//   dequantised: (q - 128) * scale in f32.
//
// A NaN or infinite value makes the row unusable, as on the CPU: *bad is set to the first
// such row number + 1 (atomicMin) and the caller reports the error.
//
// Launch both with blocks of XCP_QNT8_BLOCK threads and any grid (grid-strided over rows).
//
// Fast path (row_len a multiple of 4, f32 rows 16-byte aligned, QNT8 rows 4-byte aligned): a
// group of xcp_qnt8_group(row_len) threads (a power of two up to the block) takes each row,
// so a block holds XCP_QNT8_BLOCK / group rows at once; each thread loads 4 values per
// 16-byte load, keeps its first XCP_QNT8_VEC loads in registers between the row's maximum and
// its quantisation (rows up to 4 · XCP_QNT8_VEC · XCP_QNT8_BLOCK values are read once), and
// stores 4 bytes at a time. The maximum is reduced with warp shuffles, then across the
// group's warps in shared memory. Anything else takes the general path: one block per row,
// one value per thread and step. kernels.rs sizes the grid as xcp_qnt8_group says.

#define XCP_QNT8_BLOCK 256
#define XCP_QNT8_SCALE_BYTES 4
#define XCP_QNT8_LEVELS 127.0f
#define XCP_QNT8_ZERO 128
#define XCP_QNT8_ROUND_MAGIC 12583040.0f /* 1.5 * 2^23 + 128 */
#define XCP_QNT8_VEC 4 /* 16-byte loads a thread keeps in registers */
#define XCP_QNT8_WARP 32

struct __attribute__((aligned(16))) xcp_qnt8_f4 {
    float x, y, z, w;
};

// Threads per row on the fast path: the power of two at or above row_len / 4, at most a block.
__device__ __forceinline__ unsigned int xcp_qnt8_group(unsigned int row_len)
{
    unsigned int want = row_len / 4, t = 1;
    while (t < want && t < XCP_QNT8_BLOCK) t <<= 1;
    return t;
}

__device__ __forceinline__ unsigned int xcp_qnt8_absmax4(unsigned int m, xcp_qnt8_f4 a)
{
    unsigned int b;
    b = __float_as_uint(a.x) & 0x7fffffffu; m = b > m ? b : m;
    b = __float_as_uint(a.y) & 0x7fffffffu; m = b > m ? b : m;
    b = __float_as_uint(a.z) & 0x7fffffffu; m = b > m ? b : m;
    b = __float_as_uint(a.w) & 0x7fffffffu; m = b > m ? b : m;
    return m;
}

// The maximum of `m` over the `group` threads of the caller's row. Every thread of the block
// calls it the same number of times (it synchronises the block when a group spans warps).
__device__ __forceinline__ unsigned int xcp_qnt8_group_max(unsigned int m, unsigned int group,
                                                           unsigned int *red)
{
    for (unsigned int off = 1; off < XCP_QNT8_WARP; off <<= 1) {
        unsigned int o = __shfl_xor_sync(0xffffffffu, m, off);
        if (off < group) m = o > m ? o : m;
    }
    if (group > XCP_QNT8_WARP) {
        if ((threadIdx.x & (XCP_QNT8_WARP - 1)) == 0) red[threadIdx.x / XCP_QNT8_WARP] = m;
        __syncthreads();
        const unsigned int warps = group / XCP_QNT8_WARP;
        const unsigned int first = (threadIdx.x / group) * warps;
        m = 0;
        for (unsigned int w = 0; w < warps; w++) {
            unsigned int o = red[first + w];
            m = o > m ? o : m;
        }
        __syncthreads();
    }
    return m;
}

// One value's byte under `mode` (0 zero row, 1 normal scale, 2 subnormal scale).
__device__ __forceinline__ unsigned int xcp_qnt8_byte(float x, int mode, float inv, double ds)
{
    if (mode == 1) {
        float t = __fadd_rn(__fmul_rn(x, inv), XCP_QNT8_ROUND_MAGIC);
        return __float_as_uint(t) & 0xffu;
    }
    if (mode == 2) {
        double v = rint(__ddiv_rn((double)x, ds)) + 128.0;
        v = v < 0.0 ? 0.0 : (v > 255.0 ? 255.0 : v);
        return (unsigned int)v;
    }
    return XCP_QNT8_ZERO;
}

__device__ __forceinline__ unsigned int xcp_qnt8_word(xcp_qnt8_f4 a, int mode, float inv,
                                                      double ds)
{
    return xcp_qnt8_byte(a.x, mode, inv, ds) | (xcp_qnt8_byte(a.y, mode, inv, ds) << 8) |
           (xcp_qnt8_byte(a.z, mode, inv, ds) << 16) | (xcp_qnt8_byte(a.w, mode, inv, ds) << 24);
}

// The fast path of xcp_qnt8_rows (see the top of the file).
__device__ void xcp_qnt8_rows_vec(const float *src, unsigned char *dst, unsigned long long rows,
                                  unsigned int row_len, unsigned long long *bad)
{
    __shared__ unsigned int red[XCP_QNT8_BLOCK / XCP_QNT8_WARP];
    const unsigned int group = xcp_qnt8_group(row_len);
    const unsigned int per_block = XCP_QNT8_BLOCK / group;
    const unsigned int lane = threadIdx.x % group;
    const unsigned int quads = row_len / 4;
    const unsigned long long row_bytes = XCP_QNT8_SCALE_BYTES + (unsigned long long)row_len;
    for (unsigned long long first = (unsigned long long)blockIdx.x * per_block; first < rows;
         first += (unsigned long long)gridDim.x * per_block) {
        const unsigned long long r = first + threadIdx.x / group;
        const bool live = r < rows;
        const xcp_qnt8_f4 *x = (const xcp_qnt8_f4 *)(src + (live ? r : 0) * row_len);
        xcp_qnt8_f4 v[XCP_QNT8_VEC];
        unsigned int m = 0;
#pragma unroll
        for (int k = 0; k < XCP_QNT8_VEC; k++) {
            const unsigned int i = lane + k * group;
            if (live && i < quads) {
                v[k] = x[i];
                m = xcp_qnt8_absmax4(m, v[k]);
            }
        }
        if (live)
            for (unsigned int i = lane + XCP_QNT8_VEC * group; i < quads; i += group)
                m = xcp_qnt8_absmax4(m, x[i]);
        m = xcp_qnt8_group_max(m, group, red);
        if (!live) continue;
        // Every thread of the row works out the scale from the same maximum.
        float scale = 1.0f, inv = 0.0f;
        double ds = 0.0;
        int mode = 0;
        if (m >= 0x7f800000u) {
            mode = 3;
        } else if (m != 0) {
            const float max = __uint_as_float(m);
            scale = __fdiv_rn(max, XCP_QNT8_LEVELS);
            if ((__float_as_uint(scale) & 0x7f800000u) != 0) {
                mode = 1;
                inv = __fdiv_rn(1.0f, scale);
            } else {
                mode = 2;
                scale = __double2float_rn(__ddiv_rn((double)max, 127.0));
                if (scale == 0.0f) scale = __uint_as_float(1u);
                ds = (double)scale;
            }
        }
        unsigned char *out = dst + r * row_bytes;
        if (lane == 0) {
            if (mode == 3) atomicMin(bad, r + 1);
            *(unsigned int *)out = __float_as_uint(scale);
        }
        if (mode == 3) continue;
        unsigned int *q = (unsigned int *)(out + XCP_QNT8_SCALE_BYTES);
#pragma unroll
        for (int k = 0; k < XCP_QNT8_VEC; k++) {
            const unsigned int i = lane + k * group;
            if (i < quads) q[i] = xcp_qnt8_word(v[k], mode, inv, ds);
        }
        for (unsigned int i = lane + XCP_QNT8_VEC * group; i < quads; i += group)
            q[i] = xcp_qnt8_word(x[i], mode, inv, ds);
    }
}

extern "C" __global__ void xcp_qnt8_rows(const float *src, unsigned char *dst,
                                         unsigned long long rows, unsigned int row_len,
                                         unsigned long long *bad)
{
    if (row_len % 4 == 0 && ((unsigned long long)src & 15) == 0 &&
        ((unsigned long long)dst & 3) == 0) {
        xcp_qnt8_rows_vec(src, dst, rows, row_len, bad);
        return;
    }
    __shared__ unsigned int red[XCP_QNT8_BLOCK];
    __shared__ float s_inv;
    __shared__ double s_dscale;
    __shared__ int s_mode; /* 0 zero, 1 fast, 2 tiny, 3 not finite */
    const unsigned long long row_bytes = XCP_QNT8_SCALE_BYTES + (unsigned long long)row_len;
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *x = src + r * row_len;
        unsigned char *out = dst + r * row_bytes;
        unsigned int m = 0;
        for (unsigned int i = threadIdx.x; i < row_len; i += blockDim.x) {
            unsigned int b = __float_as_uint(x[i]) & 0x7fffffffu;
            m = b > m ? b : m;
        }
        red[threadIdx.x] = m;
        __syncthreads();
        for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                unsigned int o = red[threadIdx.x + s];
                if (o > red[threadIdx.x]) red[threadIdx.x] = o;
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            unsigned int mb = red[0];
            float scale = 1.0f;
            int mode = 0;
            if (mb >= 0x7f800000u) {
                mode = 3;
                atomicMin(bad, r + 1);
            } else if (mb != 0) {
                float max = __uint_as_float(mb);
                scale = __fdiv_rn(max, XCP_QNT8_LEVELS);
                if ((__float_as_uint(scale) & 0x7f800000u) != 0) {
                    mode = 1;
                    s_inv = __fdiv_rn(1.0f, scale);
                } else {
                    mode = 2;
                    scale = __double2float_rn(__ddiv_rn((double)max, 127.0));
                    if (scale == 0.0f) scale = __uint_as_float(1u);
                    s_dscale = (double)scale;
                }
            }
            s_mode = mode;
            unsigned int sb = __float_as_uint(scale);
            out[0] = (unsigned char)(sb & 0xff);
            out[1] = (unsigned char)((sb >> 8) & 0xff);
            out[2] = (unsigned char)((sb >> 16) & 0xff);
            out[3] = (unsigned char)(sb >> 24);
        }
        __syncthreads();
        const int mode = s_mode;
        unsigned char *q = out + XCP_QNT8_SCALE_BYTES;
        if (mode == 0) {
            for (unsigned int i = threadIdx.x; i < row_len; i += blockDim.x) q[i] = XCP_QNT8_ZERO;
        } else if (mode == 1) {
            const float inv = s_inv;
            for (unsigned int i = threadIdx.x; i < row_len; i += blockDim.x) {
                float t = __fadd_rn(__fmul_rn(x[i], inv), XCP_QNT8_ROUND_MAGIC);
                q[i] = (unsigned char)(__float_as_uint(t) & 0xffu);
            }
        } else if (mode == 2) {
            const double ds = s_dscale;
            for (unsigned int i = threadIdx.x; i < row_len; i += blockDim.x) {
                double v = rint(__ddiv_rn((double)x[i], ds)) + 128.0;
                v = v < 0.0 ? 0.0 : (v > 255.0 ? 255.0 : v);
                q[i] = (unsigned char)v;
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void xcp_qnt8_rows_to_f32(const unsigned char *src, float *dst,
                                                unsigned long long rows, unsigned int row_len)
{
    if (row_len % 4 == 0 && ((unsigned long long)src & 3) == 0 &&
        ((unsigned long long)dst & 15) == 0) {
        // Fast path: a group of threads per row, 4 bytes in and 16 bytes out per step.
        const unsigned int group = xcp_qnt8_group(row_len);
        const unsigned int per_block = XCP_QNT8_BLOCK / group;
        const unsigned int lane = threadIdx.x % group;
        const unsigned int quads = row_len / 4;
        const unsigned long long row_bytes = XCP_QNT8_SCALE_BYTES + (unsigned long long)row_len;
        for (unsigned long long r = (unsigned long long)blockIdx.x * per_block + threadIdx.x / group;
             r < rows; r += (unsigned long long)gridDim.x * per_block) {
            const unsigned char *row = src + r * row_bytes;
            const float scale = __uint_as_float(*(const unsigned int *)row);
            const unsigned int *q = (const unsigned int *)(row + XCP_QNT8_SCALE_BYTES);
            xcp_qnt8_f4 *d = (xcp_qnt8_f4 *)(dst + r * row_len);
            for (unsigned int i = lane; i < quads; i += group) {
                const unsigned int w = q[i];
                xcp_qnt8_f4 o;
                o.x = __fmul_rn(__fsub_rn((float)(w & 0xffu), 128.0f), scale);
                o.y = __fmul_rn(__fsub_rn((float)((w >> 8) & 0xffu), 128.0f), scale);
                o.z = __fmul_rn(__fsub_rn((float)((w >> 16) & 0xffu), 128.0f), scale);
                o.w = __fmul_rn(__fsub_rn((float)(w >> 24), 128.0f), scale);
                d[i] = o;
            }
        }
        return;
    }
    const unsigned long long row_bytes = XCP_QNT8_SCALE_BYTES + (unsigned long long)row_len;
    const unsigned long long n = rows * row_len;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        unsigned long long r = i / row_len;
        unsigned int c = (unsigned int)(i - r * row_len);
        const unsigned char *row = src + r * row_bytes;
        unsigned int sb = (unsigned int)row[0] | ((unsigned int)row[1] << 8) |
                          ((unsigned int)row[2] << 16) | ((unsigned int)row[3] << 24);
        float scale = __uint_as_float(sb);
        float q = (float)row[XCP_QNT8_SCALE_BYTES + c];
        dst[i] = __fmul_rn(__fsub_rn(q, 128.0f), scale);
    }
}
