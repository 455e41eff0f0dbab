// F32 <-> F16 casts for TENSOR_F16 bodies made on the device (xcp, feature `cuda`).
//
// Compiled at run time by NVRTC (see src/attach/cuda/kernels.rs); no CUDA header is needed:
// the conversions are the PTX instructions themselves.
//
// xcp_f32_to_f16: round to nearest, ties to even (cvt.rn.f16.f32), overflow to infinity,
// the same bits as half::f16::from_f32 on the CPU for every value that is not a NaN (a NaN
// becomes the canonical 0x7fff here).
// xcp_f16_to_f32: exact (cvt.f32.f16).
//
// Both are memory-bound: where both pointers are 16-byte aligned, each thread moves 8 values
// per step with 16-byte loads and stores (XCP_CAST_VEC); the rest, and any misaligned call,
// goes one value at a time. Launch with any grid (kernels.rs sizes it for the 8-value steps).

#define XCP_CAST_VEC 8

struct __attribute__((aligned(16))) xcp_cast_f4 {
    float x, y, z, w;
};
struct __attribute__((aligned(16))) xcp_cast_u4 {
    unsigned int x, y, z, w;
};

__device__ __forceinline__ unsigned short xcp_h(float f)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float xcp_f(unsigned short h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned int xcp_h2(float lo, float hi)
{
    return (unsigned int)xcp_h(lo) | ((unsigned int)xcp_h(hi) << 16);
}

extern "C" __global__ void xcp_f32_to_f16(const float *__restrict__ src,
                                          unsigned short *__restrict__ dst,
                                          unsigned long long n)
{
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long done = 0;
    if ((((unsigned long long)src | (unsigned long long)dst) & 15) == 0) {
        const unsigned long long groups = n / XCP_CAST_VEC;
        const xcp_cast_f4 *s = (const xcp_cast_f4 *)src;
        xcp_cast_u4 *d = (xcp_cast_u4 *)dst;
        for (unsigned long long g = tid; g < groups; g += stride) {
            const xcp_cast_f4 a = s[2 * g], b = s[2 * g + 1];
            xcp_cast_u4 o;
            o.x = xcp_h2(a.x, a.y);
            o.y = xcp_h2(a.z, a.w);
            o.z = xcp_h2(b.x, b.y);
            o.w = xcp_h2(b.z, b.w);
            d[g] = o;
        }
        done = groups * XCP_CAST_VEC;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) dst[i] = xcp_h(src[i]);
}

extern "C" __global__ void xcp_f16_to_f32(const unsigned short *__restrict__ src,
                                          float *__restrict__ dst, unsigned long long n)
{
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long done = 0;
    if ((((unsigned long long)src | (unsigned long long)dst) & 15) == 0) {
        const unsigned long long groups = n / XCP_CAST_VEC;
        const xcp_cast_u4 *s = (const xcp_cast_u4 *)src;
        xcp_cast_f4 *d = (xcp_cast_f4 *)dst;
        for (unsigned long long g = tid; g < groups; g += stride) {
            const xcp_cast_u4 h = s[g];
            xcp_cast_f4 a, b;
            a.x = xcp_f((unsigned short)(h.x & 0xffff));
            a.y = xcp_f((unsigned short)(h.x >> 16));
            a.z = xcp_f((unsigned short)(h.y & 0xffff));
            a.w = xcp_f((unsigned short)(h.y >> 16));
            b.x = xcp_f((unsigned short)(h.z & 0xffff));
            b.y = xcp_f((unsigned short)(h.z >> 16));
            b.z = xcp_f((unsigned short)(h.w & 0xffff));
            b.w = xcp_f((unsigned short)(h.w >> 16));
            d[2 * g] = a;
            d[2 * g + 1] = b;
        }
        done = groups * XCP_CAST_VEC;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) dst[i] = xcp_f(src[i]);
}
