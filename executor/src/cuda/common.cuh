// Shared device helpers, prepended to every kernel source by `kernels.rs` (NVRTC compiles one
// string per module, and these helpers need no CUDA header, so the sources compile with nothing
// but libnvrtc: no include path, no toolkit).

typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;

// A grid-stride loop over 64-bit indices: any launch size covers any length.
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// IEEE half to float, exact, via the PTX conversion instruction (no cuda_fp16.h needed).
__device__ __forceinline__ float half_bits_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// bfloat16 is the top half of an f32: widening is a shift, exact.
__device__ __forceinline__ float bf16_bits_to_float(u16 b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// f32 to bfloat16 with round-to-nearest-even; NaN stays a (quiet) NaN. Same results as the
// `half` crate's bf16::from_f32, which the CPU kernels use for their bf16 input rounding.
__device__ __forceinline__ u16 float_to_bf16_bits(float f) {
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    unsigned int round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) {
        return (u16)((x >> 16) + 1u);
    }
    return (u16)(x >> 16);
}

__device__ __forceinline__ float neg_infinity() {
    return __int_as_float(0xff800000);
}

// Reductions over a whole thread block (blockDim.x a multiple of 32, at most 1024). `shared`
// must hold 32 floats. Every thread gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) {
        v = warp_sum(v);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : neg_infinity();
    if (warp == 0) {
        v = warp_max(v);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}
