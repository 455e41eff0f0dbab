// Runs the CUDA C of kernels/qnt8.cu and kernels/check.cu on the host, for tests/cuda.rs on
// machines without a GPU: one block at a time, blockDim.x std::threads, `__shared__` as
// function statics (shared by the block's threads), `__syncthreads` as a barrier, and the
// rounding intrinsics as plain IEEE operations (built with -ffp-contract=off, so nothing is
// fused), warp shuffles through a block-wide exchange. The PTX conversions of cast.cu have no host form and are not run here.
//
// Usage: emu rows row_len grid in.f32 out.qnt8 out.f32 words seed out.pattern
// Prints `bad=<first bad row + 1, or 0>` and `mismatch=<n> mismatch_after_flip=<n>`.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
};
thread_local dim3 threadIdx;
static dim3 blockIdx, blockDim, gridDim;
static std::barrier<> *block_barrier;
static std::mutex atomics;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
// A warp shuffle as the whole block's exchange: every thread of the block must call it (the
// kernels do), and lanes read across warps only where a real warp would (xor below 32).
static unsigned shuffle_slots[1024];
static inline unsigned __shfl_xor_sync(unsigned, unsigned v, unsigned lane_mask)
{
    shuffle_slots[threadIdx.x] = v;
    __syncthreads();
    unsigned o = shuffle_slots[threadIdx.x ^ lane_mask];
    __syncthreads();
    return o;
}
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline double __ddiv_rn(double a, double b) { volatile double r = a / b; return r; }
static inline float __double2float_rn(double d) { return (float)d; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v)
{
    std::lock_guard<std::mutex> g(atomics);
    unsigned long long o = *p;
    if (v < o) *p = v;
    return o;
}
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v)
{
    std::lock_guard<std::mutex> g(atomics);
    unsigned long long o = *p;
    *p = o + v;
    return o;
}

using std::rint;

#include "qnt8.cu"
#include "check.cu"

static void launch(unsigned grid, unsigned block, const std::function<void()> &kernel)
{
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; b++) {
        blockIdx = {b, 0, 0};
        std::barrier<> bar(block);
        block_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++)
            threads.emplace_back([&, t] {
                threadIdx = {t, 0, 0};
                kernel();
            });
        for (auto &t : threads) t.join();
    }
}

static std::vector<char> read_file(const char *path)
{
    std::vector<char> out;
    FILE *f = std::fopen(path, "rb");
    if (!f) std::exit(2);
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
    std::fclose(f);
    return out;
}

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = std::fopen(path, "wb");
    if (!f || std::fwrite(p, 1, n, f) != n) std::exit(2);
    std::fclose(f);
}

int main(int argc, char **argv)
{
    if (argc != 10) return 2;
    unsigned long long rows = std::strtoull(argv[1], nullptr, 10);
    unsigned row_len = (unsigned)std::strtoul(argv[2], nullptr, 10);
    unsigned grid = (unsigned)std::strtoul(argv[3], nullptr, 10);
    std::vector<char> raw = read_file(argv[4]);
    std::vector<float> x(rows * row_len);
    if (raw.size() != x.size() * 4) return 2;
    std::memcpy(x.data(), raw.data(), raw.size());

    std::vector<unsigned char> q(rows * (4 + row_len));
    unsigned long long bad = ~0ull;
    launch(grid, 256, [&] { xcp_qnt8_rows(x.data(), q.data(), rows, row_len, &bad); });
    std::printf("bad=%llu\n", bad == ~0ull ? 0ull : bad);
    write_file(argv[5], q.data(), q.size());

    std::vector<float> d(rows * row_len);
    launch(3, 256, [&] { xcp_qnt8_rows_to_f32(q.data(), d.data(), rows, row_len); });
    write_file(argv[6], d.data(), d.size() * 4);

    unsigned long long words = std::strtoull(argv[7], nullptr, 10);
    unsigned seed = (unsigned)std::strtoul(argv[8], nullptr, 10);
    std::vector<unsigned> p(words);
    launch(2, 256, [&] { xcp_fill_pattern(p.data(), words, seed); });
    write_file(argv[9], p.data(), p.size() * 4);
    unsigned long long m0 = 0, m1 = 0;
    launch(2, 256, [&] { xcp_count_mismatch(p.data(), words, seed, &m0); });
    if (words > 0) p[words / 2] ^= 1u;
    launch(2, 256, [&] { xcp_count_mismatch(p.data(), words, seed, &m1); });
    std::printf("mismatch=%llu mismatch_after_flip=%llu\n", m0, m1);
    return 0;
}
