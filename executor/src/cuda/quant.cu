// 4-bit group dequantization (FlexGen's scheme, primitives/src/quant): expands a compressed
// [out, in] weight matrix, or a run of its rows, to f32 so that cuBLAS can multiply it.
//
// Layout (primitives/src/quant/matrix.rs and group.rs, matched exactly):
// - a group is 64 values: 32 bytes of codes, one f16 scale, one f16 minimum; value p (0..64) is
//   byte p % 32, low nibble for p < 32, high nibble for p >= 32; it is code * scale + min.
// - full row blocks: rows 64b..64b+64 of column c are group b * in + c (value p = row - 64b).
// - the tail (the last out % 64 rows, `tail` of them) is flattened column by column, flat index
//   f = c * tail + j for row 64 * full + j, and cut into groups of 64 after the full blocks:
//   group full * in + f / 64, value f % 64.
//
// The product and the sum are rounded separately (__fmul_rn, __fadd_rn: never fused into an
// FMA), as the CPU's `code as f32 * scale + min` is, so the expansion is bit-identical to
// QuantizedMatrix::dequantize.
//
// One thread per output element, grid-stride: consecutive threads write consecutive columns of a
// row (coalesced stores); the codes they read are 32 bytes apart within a block.

extern "C" __global__ void dequant_q4_f32(float* out, const u8* codes, const u16* scales,
                                          const u16* mins, u64 out_features, u64 in_features,
                                          u64 row0, u64 rows) {
    const u64 full = out_features / 64;
    const u64 tail = out_features % 64;
    GRID_STRIDE(i, rows * in_features) {
        const u64 r = row0 + i / in_features, c = i % in_features;
        u64 g, p;
        if (r < full * 64) {
            g = (r / 64) * in_features + c;
            p = r % 64;
        } else {
            const u64 f = c * tail + (r - full * 64);
            g = full * in_features + f / 64;
            p = f % 64;
        }
        const u8 byte = codes[g * 32 + p % 32];
        const unsigned code = p < 32 ? (byte & 15u) : (byte >> 4);
        const float s = half_bits_to_float(scales[g]);
        const float m = half_bits_to_float(mins[g]);
        out[i] = __fadd_rn(__fmul_rn((float)code, s), m);
    }
}
