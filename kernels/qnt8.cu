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
// Launch xcp_qnt8_rows with one block of XCP_QNT8_BLOCK threads per row (grid-strided over
// rows); xcp_qnt8_rows_to_f32 with any grid.

#define XCP_QNT8_BLOCK 256
#define XCP_QNT8_SCALE_BYTES 4
#define XCP_QNT8_LEVELS 127.0f
#define XCP_QNT8_ZERO 128
#define XCP_QNT8_ROUND_MAGIC 12583040.0f /* 1.5 * 2^23 + 128 */

extern "C" __global__ void xcp_qnt8_rows(const float *src, unsigned char *dst,
                                         unsigned long long rows, unsigned int row_len,
                                         unsigned long long *bad)
{
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
