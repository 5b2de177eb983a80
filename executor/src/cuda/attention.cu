// Causal multi-head attention of one sequence over its KV cache, with the CPU kernel's masking
// rules: query i (of q_len, the last q_len positions) sees keys 0..=kv_len-q_len+i whose
// key_valid byte is non-zero; a query with no valid key outputs zeros.
//
// One thread block per (query row, head): grid = (q_len, num_heads). Scores go to a global
// scratch row of kv_len floats per block (`probs`, [q_len * num_heads, kv_len]), so the cache
// length is not limited by shared memory. Layout of q/out: [q_len, num_heads * head_dim];
// k/v: [kv_len, num_heads * head_dim].

extern "C" __global__ void attention_f32(const float* q, const float* k, const float* v,
                                         const u8* key_valid, float* out, float* probs,
                                         u64 q_len, u64 kv_len, u64 num_heads, u64 head_dim,
                                         float scale) {
    __shared__ float shared[32];
    const u64 i = blockIdx.x, h = blockIdx.y;
    const u64 d = num_heads * head_dim;
    const u64 last = kv_len - q_len + i;  // newest key this query may see
    const float* qh = q + i * d + h * head_dim;
    float* oh = out + i * d + h * head_dim;
    float* p = probs + (i * num_heads + h) * kv_len;

    float local_max = neg_infinity();
    for (u64 j = threadIdx.x; j <= last; j += blockDim.x) {
        float s = neg_infinity();
        if (key_valid[j]) {
            const float* kj = k + j * d + h * head_dim;
            float dot = 0.0f;
            for (u64 c = 0; c < head_dim; ++c) dot += qh[c] * kj[c];
            s = dot * scale;
            local_max = fmaxf(local_max, s);
        }
        p[j] = s;
    }
    const float max = block_max(local_max, shared);
    if (max == neg_infinity()) {  // no valid key: block-uniform, so every thread returns
        for (u64 c = threadIdx.x; c < head_dim; c += blockDim.x) oh[c] = 0.0f;
        return;
    }

    float local_sum = 0.0f;
    for (u64 j = threadIdx.x; j <= last; j += blockDim.x) {
        float e = key_valid[j] ? expf(p[j] - max) : 0.0f;
        p[j] = e;
        local_sum += e;
    }
    const float inv = 1.0f / block_sum(local_sum, shared);  // also orders the writes to p

    for (u64 c = threadIdx.x; c < head_dim; c += blockDim.x) {
        float acc = 0.0f;
        for (u64 j = 0; j <= last; ++j) {
            // Masked keys are skipped, not multiplied by zero: a padding row may hold anything.
            if (key_valid[j]) acc += p[j] * v[j * d + h * head_dim + c];
        }
        oh[c] = acc * inv;
    }
}
