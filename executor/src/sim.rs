//! The `sim` device: a second, CPU-backed [`Device`] with its own buffers, explicit counted copies
//! and a capacity limit, computing with the same CPU kernels as [`crate::backend::CpuBackend`].
//!
//! It exists so that GPU placements, the HeteGen split and the parameter manager run (and are
//! checked for identical tokens) on machines without a GPU (design section 6). Its buffers are
//! separately allocated host memory that the rest of the executor can reach only through
//! [`Device::upload`] / [`Device::download`], so a missing copy shows up as wrong results, and
//! the copy counters say exactly what a GPU run would move over PCIe. Its speed says nothing
//! about a GPU's: copies are plain memcpys and the kernels are the host's.

use crate::device::{Device, DeviceBuf, DeviceError, DeviceMatrix, TransferStats};
use crate::kernels::{self, Matrix, WeightData};
use crate::weights::ElementType;
use std::sync::Mutex;

/// Buffers and counters behind the device's lock.
#[derive(Default)]
struct State {
    /// Buffer memory by handle id (8-byte words, so any element type can be viewed in place);
    /// `None` once freed.
    bufs: Vec<Option<Vec<u64>>>,
    used: u64,
    peak: u64,
    transfers: TransferStats,
    /// Attention scratch, grown on demand (host-side kernel detail, not device memory).
    scratch: Vec<f32>,
}

/// A simulated GPU: see the module docs.
pub struct SimDevice {
    capacity: u64,
    state: Mutex<State>,
}

/// Capacity of `--device sim` when none is given: a 16 GiB GPU (FlexGen's T4).
pub const DEFAULT_SIM_CAPACITY: u64 = 16 << 30;

impl SimDevice {
    /// The device a `--device` argument names: `sim` ([`DEFAULT_SIM_CAPACITY`]) or
    /// `sim:CAPACITY` (`sim:512MiB`, `sim:2GiB`, bytes); anything else is refused with the forms
    /// that are accepted (`cuda` is [`crate::cuda::CudaDevice::from_arg`]'s).
    pub fn from_arg(text: &str) -> crate::Result<SimDevice> {
        let bad = |why: &str| {
            crate::ExecError::InvalidRequest(format!(
                "--device {text}: {why}; expected sim or sim:CAPACITY (e.g. sim:512MiB, sim:2GiB), \
                 or cuda or cuda:CAPACITY on a GPU"
            ))
        };
        match text.split_once(':') {
            None if text == "sim" => Ok(SimDevice::new(DEFAULT_SIM_CAPACITY)),
            Some(("sim", cap)) => crate::device::parse_capacity(cap)
                .map(SimDevice::new)
                .ok_or_else(|| bad(&format!("'{cap}' is not a capacity"))),
            _ => Err(bad("unknown device")),
        }
    }

    /// A device that may allocate up to `capacity` bytes.
    pub fn new(capacity: u64) -> SimDevice {
        SimDevice {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain memory behind, still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes `offset..offset + len` of `buf`, or the error that says why a copy does not fit.
    fn copy_range(
        &self,
        buf: &DeviceBuf,
        offset: usize,
        len: usize,
        op: &str,
    ) -> Result<std::ops::Range<usize>, DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= buf.bytes() => Ok(offset..end),
            _ => Err(self.invalid(format!(
                "{op} of {len} bytes at offset {offset} does not fit buffer {} ({} bytes)",
                buf.id(),
                buf.bytes()
            ))),
        }
    }

    fn invalid(&self, message: String) -> DeviceError {
        DeviceError::Invalid {
            device: "sim".into(),
            message,
        }
    }
}

/// Byte view of a buffer.
fn bytes(words: &[u64]) -> &[u8] {
    bytemuck::cast_slice(words)
}

fn bytes_mut(words: &mut [u64]) -> &mut [u8] {
    bytemuck::cast_slice_mut(words)
}

impl State {
    fn get(&self, b: &DeviceBuf) -> Option<&[u8]> {
        self.bufs
            .get(b.id())
            .and_then(|x| x.as_deref())
            .map(|w| &bytes(w)[..b.bytes()])
    }

    /// Takes buffer `b` out of the table so that it can be written while others are read.
    fn take(&mut self, b: &DeviceBuf) -> Option<Vec<u64>> {
        self.bufs.get_mut(b.id()).and_then(Option::take)
    }

    fn put(&mut self, b: &DeviceBuf, words: Vec<u64>) {
        self.bufs[b.id()] = Some(words);
    }
}

/// `bytes[offset..offset + len]` as f32, or `None` when out of range or misaligned.
fn f32_range(bytes: &[u8], offset: usize, len: usize) -> Option<&[f32]> {
    let end = offset.checked_add(len.checked_mul(4)?)?;
    bytemuck::try_cast_slice(bytes.get(offset..end)?).ok()
}

impl SimDevice {
    /// Runs `f` with the output buffer `y` taken out of the table (as f32) and the table readable,
    /// so that `y` may be written while inputs are read. `y` must not be one of the inputs.
    fn with_output<R>(
        &self,
        y: &DeviceBuf,
        y_floats: usize,
        f: impl FnOnce(&mut State, &mut [f32]) -> Result<R, DeviceError>,
    ) -> Result<R, DeviceError> {
        let mut st = self.lock();
        let mut out = st
            .take(y)
            .ok_or_else(|| self.invalid(format!("output buffer {} is not allocated", y.id())))?;
        let r = match bytemuck::cast_slice_mut::<u64, f32>(&mut out).get_mut(..y_floats) {
            Some(ys) => f(&mut st, ys),
            None => Err(self.invalid(format!(
                "output of {y_floats} floats does not fit buffer {} ({} bytes)",
                y.id(),
                y.bytes()
            ))),
        };
        st.put(y, out);
        r
    }
}

impl Device for SimDevice {
    fn name(&self) -> &str {
        "sim"
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    fn peak_bytes(&self) -> u64 {
        self.lock().peak
    }

    fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuf, DeviceError> {
        let mut st = self.lock();
        let requested = bytes as u64;
        if st.used + requested > self.capacity {
            return Err(DeviceError::OutOfMemory {
                device: "sim".into(),
                what: what.to_string(),
                requested,
                in_use: st.used,
                capacity: self.capacity,
            });
        }
        st.used += requested;
        st.peak = st.peak.max(st.used);
        let words = Some(vec![0u64; bytes.div_ceil(8)]);
        // Freed slots are reused: a handle is consumed by `free`, so no stale one can name it.
        let id = match st.bufs.iter().position(Option::is_none) {
            Some(id) => {
                st.bufs[id] = words;
                id
            }
            None => {
                st.bufs.push(words);
                st.bufs.len() - 1
            }
        };
        Ok(DeviceBuf::new(id, bytes))
    }

    fn free(&self, buf: DeviceBuf) {
        let mut st = self.lock();
        if st.take(&buf).is_some() {
            st.used -= buf.bytes() as u64;
        }
    }

    fn upload(&self, dst: &DeviceBuf, offset: usize, src: &[u8]) -> Result<(), DeviceError> {
        let range = self.copy_range(dst, offset, src.len(), "upload")?;
        let mut st = self.lock();
        let words = st.bufs.get_mut(dst.id()).and_then(|b| b.as_mut());
        let words = words.ok_or_else(|| self.invalid(format!("buffer {} is freed", dst.id())))?;
        bytes_mut(words)[range].copy_from_slice(src);
        st.transfers.h2d_bytes += src.len() as u64;
        st.transfers.h2d_calls += 1;
        Ok(())
    }

    fn download(&self, src: &DeviceBuf, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError> {
        let range = self.copy_range(src, offset, dst.len(), "download")?;
        let mut st = self.lock();
        let b = st.get(src);
        let b = b.ok_or_else(|| self.invalid(format!("buffer {} is freed", src.id())))?;
        dst.copy_from_slice(&b[range]);
        st.transfers.d2h_bytes += dst.len() as u64;
        st.transfers.d2h_calls += 1;
        Ok(())
    }

    fn linear(
        &self,
        x: &DeviceBuf,
        rows: usize,
        w: &DeviceMatrix,
        y: &DeviceBuf,
    ) -> Result<(), DeviceError> {
        let (out, inp) = (w.out_features, w.in_features);
        self.with_output(y, rows * out, |st, ys| {
            let bad = |what: &str| self.invalid(format!("linear: {what} out of range"));
            let xs = st
                .get(x)
                .and_then(|b| f32_range(b, 0, rows * inp))
                .ok_or_else(|| bad("input"))?;
            let wb = st.get(w.buf).ok_or_else(|| bad("weights"))?;
            let n = out * inp;
            let end = w.offset + n * w.dtype.size();
            let wbytes = wb.get(w.offset..end).ok_or_else(|| bad("weights"))?;
            let data = match w.dtype {
                ElementType::F32 => bytemuck::try_cast_slice(wbytes).map(WeightData::F32),
                ElementType::F16 => bytemuck::try_cast_slice(wbytes).map(WeightData::F16),
                ElementType::Bf16 => bytemuck::try_cast_slice(wbytes).map(WeightData::Bf16),
            }
            .map_err(|_| bad("weight alignment"))?;
            let bias = match w.bias {
                Some((b, off)) => Some(
                    st.get(b)
                        .and_then(|bb| f32_range(bb, off, out))
                        .ok_or_else(|| bad("bias"))?,
                ),
                None => None,
            };
            let m = Matrix {
                data,
                out_features: out,
                in_features: inp,
            };
            kernels::linear(xs, rows, &m, bias, ys);
            Ok(())
        })
    }

    fn join_columns(
        &self,
        a: &DeviceBuf,
        width_a: usize,
        b: &DeviceBuf,
        width_b: usize,
        rows: usize,
        y: &DeviceBuf,
    ) -> Result<(), DeviceError> {
        let width = width_a + width_b;
        self.with_output(y, rows * width, |st, ys| {
            let bad = || self.invalid("join_columns: an input is out of range".into());
            let xa = st
                .get(a)
                .and_then(|v| f32_range(v, 0, rows * width_a))
                .ok_or_else(bad)?;
            let xb = st
                .get(b)
                .and_then(|v| f32_range(v, 0, rows * width_b))
                .ok_or_else(bad)?;
            for (t, row) in ys.chunks_exact_mut(width.max(1)).enumerate() {
                row[..width_a].copy_from_slice(&xa[t * width_a..(t + 1) * width_a]);
                row[width_a..].copy_from_slice(&xb[t * width_b..(t + 1) * width_b]);
            }
            Ok(())
        })
    }

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
    ) -> Result<(), DeviceError> {
        let d = num_heads * head_dim;
        if let Some(problem) = crate::device::attention_call_problem(q_len, kv_len, key_valid.len())
        {
            return Err(self.invalid(problem));
        }
        self.with_output(out, q_len * d, |st, os| {
            let bad = || self.invalid("attention: an input is out of range".into());
            let need = crate::backend::attention_scratch_len(kv_len, num_heads, head_dim);
            let mut scratch = std::mem::take(&mut st.scratch);
            if scratch.len() < need {
                scratch.resize(need, 0.0);
            }
            let inputs = (
                st.get(q).and_then(|b| f32_range(b, 0, q_len * d)),
                st.get(k).and_then(|b| f32_range(b, kv_offset, kv_len * d)),
                st.get(v).and_then(|b| f32_range(b, kv_offset, kv_len * d)),
            );
            let r = match inputs {
                (Some(qs), Some(ks), Some(vs)) => {
                    kernels::attention(
                        qs,
                        q_len,
                        ks.into(),
                        vs.into(),
                        kv_len,
                        key_valid,
                        num_heads,
                        head_dim,
                        1.0,
                        os,
                        &mut scratch,
                    );
                    Ok(())
                }
                _ => Err(bad()),
            };
            st.scratch = scratch;
            r
        })
    }

    fn transfers(&self) -> TransferStats {
        self.lock().transfers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_beyond_capacity_is_an_error_with_the_numbers() {
        let dev = SimDevice::new(1000);
        let a = dev.alloc(600, "first").unwrap();
        let e = dev.alloc(500, "second buffer").unwrap_err().to_string();
        assert!(
            e.contains("second buffer") && e.contains("500") && e.contains("600 of 1000"),
            "{e}"
        );
        dev.free(a);
        assert_eq!(dev.used_bytes(), 0);
        assert_eq!(dev.peak_bytes(), 600);
        dev.alloc(1000, "all").unwrap();
    }

    #[test]
    fn device_arguments_parse_or_say_what_is_accepted() {
        assert_eq!(
            SimDevice::from_arg("sim").unwrap().capacity_bytes(),
            DEFAULT_SIM_CAPACITY
        );
        assert_eq!(
            SimDevice::from_arg("sim:2MiB").unwrap().capacity_bytes(),
            2 << 20
        );
        for bad in ["gpu", "sim:lots", "simx"] {
            let e = SimDevice::from_arg(bad).err().unwrap().to_string();
            assert!(e.contains("expected sim or sim:CAPACITY"), "{e}");
        }
    }

    #[test]
    fn copies_are_counted_and_round_trip() {
        let dev = SimDevice::new(1 << 20);
        let b = dev.alloc(16, "b").unwrap();
        dev.upload(&b, 4, &[1, 2, 3, 4]).unwrap();
        let mut back = [0u8; 8];
        dev.download(&b, 0, &mut back).unwrap();
        assert_eq!(back, [0, 0, 0, 0, 1, 2, 3, 4]);
        let t = dev.transfers();
        assert_eq!(
            (t.h2d_bytes, t.h2d_calls, t.d2h_bytes, t.d2h_calls),
            (4, 1, 8, 1)
        );
        assert!(dev.upload(&b, 14, &[0; 4]).is_err());
        assert!(dev.download(&b, 0, &mut [0u8; 17]).is_err());
    }

    #[test]
    fn device_linear_and_join_match_the_cpu_kernels() {
        let dev = SimDevice::new(1 << 20);
        let (rows, inp, out) = (3, 5, 4);
        let x: Vec<f32> = (0..rows * inp).map(|i| i as f32 * 0.1 - 0.7).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let bias = [0.5f32, -0.25, 1.0, 2.0];
        let mut want = vec![0.0; rows * out];
        let m = Matrix {
            data: WeightData::F32(&w),
            out_features: out,
            in_features: inp,
        };
        kernels::linear(&x, rows, &m, Some(&bias), &mut want);

        // Rows 0..1 on the host, rows 1..4 on the device, joined on the device.
        let split = 1;
        let xb = dev.alloc(x.len() * 4, "x").unwrap();
        dev.upload(&xb, 0, bytemuck::cast_slice(&x)).unwrap();
        let wb = dev.alloc(w.len() * 4, "w").unwrap();
        dev.upload(&wb, 0, bytemuck::cast_slice(&w)).unwrap();
        let bb = dev.alloc(16, "bias").unwrap();
        dev.upload(&bb, 0, bytemuck::cast_slice(&bias)).unwrap();
        let yd = dev.alloc(rows * out * 4, "y_dev").unwrap();
        let dm = DeviceMatrix {
            buf: &wb,
            offset: split * inp * 4,
            dtype: ElementType::F32,
            out_features: out - split,
            in_features: inp,
            bias: Some((&bb, split * 4)),
        };
        dev.linear(&xb, rows, &dm, &yd).unwrap();
        let mut host = vec![0.0; rows * split];
        let hm = Matrix {
            data: WeightData::F32(&w[..split * inp]),
            out_features: split,
            in_features: inp,
        };
        kernels::linear(&x, rows, &hm, Some(&bias[..split]), &mut host);
        let yh = dev.alloc(host.len() * 4, "y_host").unwrap();
        dev.upload(&yh, 0, bytemuck::cast_slice(&host)).unwrap();
        let y = dev.alloc(rows * out * 4, "y").unwrap();
        dev.join_columns(&yh, split, &yd, out - split, rows, &y)
            .unwrap();
        let mut got = vec![0.0f32; rows * out];
        dev.download(&y, 0, bytemuck::cast_slice_mut(&mut got))
            .unwrap();
        assert_eq!(got, want);
        // An output that aliases an input is refused, not a panic.
        assert!(dev.linear(&xb, rows, &dm, &xb).is_err());
    }
}
