// Row-wise LayerNorm, one thread block per row. Two passes over the row (mean, then the biased
// variance of the centred values), as the CPU kernel and torch.nn.LayerNorm compute it, so the
// results agree to f32 rounding rather than drifting on rows with a large mean.

extern "C" __global__ void layer_norm_f32(const float* x, float* y, const float* gamma,
                                          const float* beta, u64 width, float eps) {
    __shared__ float shared[32];
    const float* xr = x + (u64)blockIdx.x * width;
    float* yr = y + (u64)blockIdx.x * width;
    float s = 0.0f;
    for (u64 c = threadIdx.x; c < width; c += blockDim.x) s += xr[c];
    float mean = block_sum(s, shared) / (float)width;
    float q = 0.0f;
    for (u64 c = threadIdx.x; c < width; c += blockDim.x) {
        float d = xr[c] - mean;
        q += d * d;
    }
    float var = block_sum(q, shared) / (float)width;
    float inv = 1.0f / sqrtf(var + eps);
    for (u64 c = threadIdx.x; c < width; c += blockDim.x) {
        yr[c] = (xr[c] - mean) * inv * gamma[c] + beta[c];
    }
}
