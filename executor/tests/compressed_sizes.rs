//! The planner's byte count for 4-bit compressed tensors (`planner::model::compressed_bytes`, used
//! by the cost model and the memory plan) must be what the executor's compressed matrices take.
//! The two live in different crates (`planner`, `primitives`), so the check lives here.

use executor::quant::{QuantizedKv, QuantizedMatrix};
use planner::model::compressed_bytes;

#[test]
fn byte_count_is_the_planners_for_every_shape() {
    // Small shapes, including partial groups, quantized for real.
    for (out, inp) in [
        (64, 64),
        (128, 96),
        (100, 3),
        (1, 1),
        (1, 65),
        (63, 5),
        (7, 130),
    ] {
        let values: Vec<f32> = (0..out * inp)
            .map(|i| (i % 13) as f32 * 0.1 - 0.6)
            .collect();
        let q = QuantizedMatrix::quantize(&values, out, inp).unwrap();
        assert_eq!(
            q.bytes() as u64,
            compressed_bytes((out * inp) as u64),
            "{out}x{inp}"
        );
        assert_eq!(q.groups(), (out * inp).div_ceil(64));
    }
    // OPT shapes (without quantizing them): qkv, out, fc1, fc2 of opt-125m .. opt-175b, the head.
    for h in [768usize, 2048, 4096, 7168, 12288] {
        for (o, i) in [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h), (50272, h)] {
            let groups = QuantizedMatrix::groups_for(o, i);
            assert_eq!(
                (groups * 36) as u64,
                compressed_bytes((o * i) as u64),
                "{o}x{i}"
            );
        }
    }
}

#[test]
fn kv_bytes_per_position_are_the_planners() {
    for width in [32usize, 64, 100, 128, 768, 4096] {
        let rows: Vec<f32> = (0..2 * width).map(|i| (i % 5) as f32 - 2.0).collect();
        let kv = QuantizedKv::from_rows(&rows, width).unwrap();
        assert_eq!(
            kv.bytes_per_position() as u64,
            compressed_bytes(width as u64),
            "{width}"
        );
        if width % 64 == 0 {
            // Keys and values together, as the planner counts a position's cache.
            assert_eq!(
                2 * kv.bytes_per_position() as u64,
                compressed_bytes(2 * width as u64)
            );
        }
    }
}
