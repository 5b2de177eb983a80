//! The one trait for a compute device with its own memory: what the GPU tiers of the block
//! schedule need from a GPU, small enough that both the `sim` device ([`crate::sim::SimDevice`])
//! and a CUDA device can provide it.
//!
//! [`crate::backend::Backend`] computes on host slices; a device computes on memory the host
//! cannot address directly, so everything that crosses the boundary goes through an explicit,
//! counted [`Device::upload`] or [`Device::download`], and every allocation is checked against the
//! device's capacity (an allocation beyond it is a [`DeviceError::OutOfMemory`] that names the
//! buffer and the numbers, never a panic). Buffers are opaque handles ([`DeviceBuf`]) rather than
//! an associated type so that the schedule can hold a `&dyn Device`: the CUDA implementation keeps
//! a table of `CudaSlice`s behind the same handles.
//!
//! The operation list is the part of a layer the GPU tiers run on the device: a matrix product
//! over a (possibly partial) weight matrix, the join of a split layer's two halves, and attention
//! over device-resident KV rows. Layer norms, residual adds and the embedding stay on the host
//! (see docs/executor.md, "GPU tiers on a device").

use crate::weights::ElementType;
use thiserror::Error;

/// A buffer in a device's memory: a handle, meaningful only to the device that made it.
///
/// Not `Clone`: each handle is freed once, by [`Device::free`] (the device also frees what is
/// left when it is dropped).
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceBuf {
    id: usize,
    bytes: usize,
}

impl DeviceBuf {
    /// A handle for buffer `id` of `bytes` bytes (for [`Device`] implementations).
    pub fn new(id: usize, bytes: usize) -> DeviceBuf {
        DeviceBuf { id, bytes }
    }

    /// The device's index of the buffer.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A weight matrix (nn.Linear layout `[out, in]`) held in a device buffer, possibly a run of
/// rows of a larger matrix (the device's share of a split layer), with its bias.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMatrix<'a> {
    /// The buffer holding the rows.
    pub buf: &'a DeviceBuf,
    /// Byte offset of the first row in `buf`.
    pub offset: usize,
    /// Element type the rows are stored in (the checkpoint's).
    pub dtype: ElementType,
    /// Rows (outputs) in this matrix.
    pub out_features: usize,
    /// Columns (inputs).
    pub in_features: usize,
    /// f32 bias of these rows: buffer and byte offset of its first element.
    pub bias: Option<(&'a DeviceBuf, usize)>,
}

/// Bytes and calls that crossed between host and device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransferStats {
    /// Bytes copied host to device.
    pub h2d_bytes: u64,
    /// Host-to-device copies.
    pub h2d_calls: u64,
    /// Bytes copied device to host.
    pub d2h_bytes: u64,
    /// Device-to-host copies.
    pub d2h_calls: u64,
}

impl TransferStats {
    /// The transfers made between `earlier` and `self` (counters only grow).
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            h2d_bytes: self.h2d_bytes - earlier.h2d_bytes,
            h2d_calls: self.h2d_calls - earlier.h2d_calls,
            d2h_bytes: self.d2h_bytes - earlier.d2h_bytes,
            d2h_calls: self.d2h_calls - earlier.d2h_calls,
        }
    }
}

/// Why a device operation failed.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// An allocation would exceed the device's capacity (a GPU's out-of-memory).
    #[error(
        "{device} device out of memory: allocating {what} ({requested} bytes) with {in_use} of \
         {capacity} bytes in use; give the device more memory (--device sim:SIZE, or cuda:SIZE up \
         to the GPU's free memory) or use a policy with a smaller GPU share"
    )]
    OutOfMemory {
        /// The device's name.
        device: String,
        /// The buffer being allocated.
        what: String,
        /// Bytes asked for.
        requested: u64,
        /// Bytes allocated before the request.
        in_use: u64,
        /// The device's capacity in bytes.
        capacity: u64,
    },
    /// A driver call failed on a device that was found and opened (a copy, a launch, cuBLAS):
    /// the device's own message, with what was being done.
    #[error("{device} device failed: {message}")]
    Failed {
        /// The device's name.
        device: String,
        /// What was being done, and the driver's error.
        message: String,
    },
    /// A handle, offset or length that does not fit the buffers it names (a caller's bug).
    #[error("{device} device: {message}")]
    Invalid {
        /// The device's name.
        device: String,
        /// What was wrong.
        message: String,
    },
}

/// A device with its own memory: allocation under a capacity, counted copies, and the layer
/// operations the GPU tiers run there.
///
/// Every method takes `&self`: implementations synchronise internally, so that the CPU half of a
/// split layer can run on another thread while the device half is issued.
pub trait Device: Send + Sync {
    /// Short name for reports and errors ("sim", "cuda").
    fn name(&self) -> &str;

    /// Bytes the device may allocate in all.
    fn capacity_bytes(&self) -> u64;

    /// Bytes allocated now.
    fn used_bytes(&self) -> u64;

    /// Largest [`Device::used_bytes`] seen.
    fn peak_bytes(&self) -> u64;

    /// A zeroed buffer of `bytes` bytes; `what` names it in an out-of-memory error.
    fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuf, DeviceError>;

    /// Returns a buffer's memory to the device.
    fn free(&self, buf: DeviceBuf);

    /// Copies `src` into `dst` at byte `offset` (host to device, counted).
    fn upload(&self, dst: &DeviceBuf, offset: usize, src: &[u8]) -> Result<(), DeviceError>;

    /// Copies `dst.len()` bytes of `src` from byte `offset` to the host (counted).
    fn download(&self, src: &DeviceBuf, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError>;

    /// `y[t, :] = x[t, :] W^T + bias` for `rows` rows on the device: `x` holds `[rows, in]` f32
    /// from offset 0, `y` receives `[rows, out]` f32 from offset 0.
    fn linear(
        &self,
        x: &DeviceBuf,
        rows: usize,
        w: &DeviceMatrix,
        y: &DeviceBuf,
    ) -> Result<(), DeviceError>;

    /// Joins the two halves of a split layer's output: `y[t] = [a[t] (width_a), b[t] (width_b)]`
    /// for `rows` rows (all f32 from offset 0).
    fn join_columns(
        &self,
        a: &DeviceBuf,
        width_a: usize,
        b: &DeviceBuf,
        width_b: usize,
        rows: usize,
        y: &DeviceBuf,
    ) -> Result<(), DeviceError>;

    /// Causal attention of `q_len` queries (`q`, f32 from offset 0) over the first `kv_len` rows
    /// of `k` and `v` (f32 from byte offsets `kv_offset`), as [`crate::kernels::attention`];
    /// the padding mask `key_valid` travels with the call. Writes `[q_len, heads * head_dim]`
    /// f32 to `out` from offset 0.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &DeviceBuf,
        q_len: usize,
        k: &DeviceBuf,
        v: &DeviceBuf,
        kv_offset: usize,
        kv_len: usize,
        key_valid: &[bool],
        num_heads: usize,
        head_dim: usize,
        out: &DeviceBuf,
    ) -> Result<(), DeviceError>;

    /// Copies counted so far.
    fn transfers(&self) -> TransferStats;
}

/// Why an attention call cannot be served (more queries than keys, a mask shorter than the
/// keys), checked the same way by every device so that they refuse the same calls.
pub fn attention_call_problem(q_len: usize, kv_len: usize, mask_len: usize) -> Option<String> {
    (q_len > kv_len || mask_len < kv_len)
        .then(|| format!("attention: {q_len} queries over {kv_len} keys with a mask of {mask_len}"))
}

/// Parses a capacity such as `512MiB`, `2GiB`, `1.5GB`, `64k` or `1048576` (bytes).
pub fn parse_capacity(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    let bytes = value * scale;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then(|| bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_parse_with_units() {
        assert_eq!(parse_capacity("1048576"), Some(1 << 20));
        assert_eq!(parse_capacity("64k"), Some(64 << 10));
        assert_eq!(parse_capacity("512MiB"), Some(512 << 20));
        assert_eq!(parse_capacity("2GiB"), Some(2 << 30));
        assert_eq!(parse_capacity("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_capacity("lots"), None);
        assert_eq!(parse_capacity("12 parsecs"), None);
    }
}
