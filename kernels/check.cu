// Device-side test pattern and its check, for verifying a hand-off without copying the
// tensor to the host (xcp, feature `cuda`). The pattern word of index i is
// xcp_pattern(i, seed), the same function as attach::cuda::kernels::pattern_word on the CPU.

__device__ __forceinline__ unsigned int xcp_pattern(unsigned long long i, unsigned int seed)
{
    unsigned long long z = i * 0x9e3779b97f4a7c15ull + seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z = z ^ (z >> 31);
    return (unsigned int)z;
}

extern "C" __global__ void xcp_fill_pattern(unsigned int *dst, unsigned long long n,
                                            unsigned int seed)
{
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride)
        dst[i] = xcp_pattern(i, seed);
}

// Adds to *bad the number of words that differ from the pattern.
extern "C" __global__ void xcp_count_mismatch(const unsigned int *src, unsigned long long n,
                                              unsigned int seed, unsigned long long *bad)
{
    unsigned long long mine = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride)
        mine += src[i] != xcp_pattern(i, seed);
    if (mine) atomicAdd(bad, mine);
}
