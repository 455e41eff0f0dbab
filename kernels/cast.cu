// F32 <-> F16 casts for TENSOR_F16 bodies made on the device (xcp, feature `cuda`).
//
// Compiled at run time by NVRTC (see src/attach/cuda/kernels.rs); no CUDA header is needed:
// the conversions are the PTX instructions themselves.
//
// xcp_f32_to_f16: round to nearest, ties to even (cvt.rn.f16.f32), overflow to infinity,
// the same bits as half::f16::from_f32 on the CPU for every value that is not a NaN (a NaN
// becomes the canonical 0x7fff here).
// xcp_f16_to_f32: exact (cvt.f32.f16).

extern "C" __global__ void xcp_f32_to_f16(const float *src, unsigned short *dst,
                                          unsigned long long n)
{
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(src[i]));
        dst[i] = h;
    }
}

extern "C" __global__ void xcp_f16_to_f32(const unsigned short *src, float *dst,
                                          unsigned long long n)
{
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(src[i]));
        dst[i] = f;
    }
}
