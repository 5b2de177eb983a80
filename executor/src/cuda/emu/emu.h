// A CPU emulation of the few CUDA features the kernels use, so that their logic (reductions,
// masking, rounding) is tested on machines without a GPU: one std::thread per CUDA thread,
// blocks run one after another, __syncthreads is a block barrier, warp shuffles go through a
// per-warp exchange buffer and barrier. Not a performance model; not a substitute for the GPU
// conformance tests (it cannot check inline PTX, memory coalescing or real warp scheduling).
// Used by the kernel_logic_on_a_cpu_emulation test in kernels.rs.
#include <barrier>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <thread>
#include <vector>
#include <memory>
#include <functional>
struct dim3e { unsigned x = 0, y = 0, z = 0; };
thread_local dim3e threadIdx, blockIdx;
dim3e blockDim, gridDim;
std::unique_ptr<std::barrier<>> block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
std::vector<std::vector<float>> warp_bufs;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_bufs[w][lane] = v;
    warp_barriers[w]->arrive_and_wait();
    float r = warp_bufs[w][lane ^ o];
    warp_barriers[w]->arrive_and_wait();
    return r;
}
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
// Separately rounded product and sum (never fused): plain float operations, since the emulation
// is built with -ffp-contract=off.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float emu_half_to_float(unsigned short h) {
    unsigned s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
template <class F>
void launch(unsigned gx, unsigned gy, unsigned bx, F f) {
    gridDim = {gx, gy, 1}; blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        block_barrier = std::make_unique<std::barrier<>>(bx);
        warp_barriers.clear(); warp_bufs.clear();
        for (unsigned w = 0; w < (bx + 31) / 32; ++w) {
            warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, bx - w * 32)));
            warp_bufs.emplace_back(32, 0.0f);
        }
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < bx; ++t) ts.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {x, y, 0}; f(); });
        for (auto& t : ts) t.join();
    }
}
