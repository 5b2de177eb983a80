// Element-wise kernels: the cheap, memory-bound operations between the matrix products, plus the
// dtype conversions the cuBLAS path needs. Every kernel is a grid-stride loop over 64-bit
// indices (GRID_STRIDE, common.cuh), so any launch size covers any length.

// x = max(x, 0). fmaxf returns 0 for a NaN input, as f32::max does on the CPU.
extern "C" __global__ void relu_f32(float* x, u64 n) {
    GRID_STRIDE(i, n) { x[i] = fmaxf(x[i], 0.0f); }
}

// x *= factor.
extern "C" __global__ void scale_f32(float* x, float factor, u64 n) {
    GRID_STRIDE(i, n) { x[i] = x[i] * factor; }
}

// acc += x.
extern "C" __global__ void add_f32(float* acc, const float* x, u64 n) {
    GRID_STRIDE(i, n) { acc[i] = acc[i] + x[i]; }
}

// y[r, c] = bias[c] for a [rows, cols] matrix: the starting value of a GEMM run with beta = 1,
// which adds the bias for free.
extern "C" __global__ void fill_rows_f32(float* y, const float* bias, u64 rows, u64 cols) {
    GRID_STRIDE(i, rows * cols) { y[i] = bias[i % cols]; }
}

// 16-bit weights widened to f32 (exact), for the f32 GEMM.
extern "C" __global__ void widen_f16_f32(float* out, const u16* in, u64 n) {
    GRID_STRIDE(i, n) { out[i] = half_bits_to_float(in[i]); }
}

extern "C" __global__ void widen_bf16_f32(float* out, const u16* in, u64 n) {
    GRID_STRIDE(i, n) { out[i] = bf16_bits_to_float(in[i]); }
}

// Activations rounded to bf16 (nearest-even) for the bf16 x bf16 -> f32 GEMM: the same rounding
// the CPU backend applies to the input of a bf16 linear layer.
extern "C" __global__ void round_f32_bf16(u16* out, const float* in, u64 n) {
    GRID_STRIDE(i, n) { out[i] = float_to_bf16_bits(in[i]); }
}

// Embedding lookup: out[t, :] = table[ids[t], :] widened to f32. An id outside the table gives a
// zero row (the host checks ids first; this only keeps a bad id from reading out of bounds).
// `dtype`: 0 = f32 (table read as floats), 1 = f16, 2 = bf16 (table read as u16 bits).
extern "C" __global__ void embedding_gather(float* out, const void* table, const unsigned int* ids,
                                            u64 tokens, u64 width, u64 vocab, int dtype) {
    GRID_STRIDE(i, tokens * width) {
        u64 t = i / width, c = i % width;
        u64 id = ids[t];
        float v = 0.0f;
        if (id < vocab) {
            u64 at = id * width + c;
            if (dtype == 0) {
                v = ((const float*)table)[at];
            } else if (dtype == 1) {
                v = half_bits_to_float(((const u16*)table)[at]);
            } else {
                v = bf16_bits_to_float(((const u16*)table)[at]);
            }
        }
        out[i] = v;
    }
}

// The join of a split layer's two halves: y[t, :] = [a[t, :] (wa columns), b[t, :] (wb columns)]
// for `rows` rows, all f32 row-major. The device half and the host half of a HeteGen split are
// computed into separate buffers; this makes the [rows, wa + wb] output the next layer reads.
extern "C" __global__ void join_columns_f32(float* y, const float* a, u64 wa, const float* b, u64 wb,
                                            u64 rows) {
    const u64 w = wa + wb;
    GRID_STRIDE(i, rows * w) {
        u64 t = i / w, c = i % w;
        y[i] = c < wa ? a[t * wa + c] : b[t * wb + (c - wa)];
    }
}
