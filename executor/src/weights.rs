//! Weight stores: where a model's tensors come from.
//!
//! Layers never own their big matrices. They hold a [`TensorId`] and ask a [`WeightStore`] for the
//! elements when they compute. Today a store is either a checkpoint memory-mapped in place
//! ([`SafetensorsStore`]) or seeded random tensors in memory ([`RandomStore`]); the offloading
//! engine (issue 4) adds stores whose tensors live on other tiers (GPU, disk) and are staged on
//! demand, without the model code changing.

use crate::error::{ExecError, Result};
use crate::kernels::{OwnedWeights, WeightData};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types the executor computes with (f32 accumulation in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16: f32's exponent range with 8 bits of mantissa.
    Bf16,
}

impl ElementType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::Bf16 => 2,
        }
    }
}

impl ElementType {
    /// The KV cache's element type for a model stored in this type.
    pub fn kv_dtype(self) -> crate::kernels::KvDtype {
        match self {
            ElementType::F32 => crate::kernels::KvDtype::F32,
            ElementType::F16 => crate::kernels::KvDtype::F16,
            ElementType::Bf16 => crate::kernels::KvDtype::Bf16,
        }
    }
}

impl From<planner::model::DType> for ElementType {
    fn from(d: planner::model::DType) -> Self {
        match d {
            planner::model::DType::F32 => ElementType::F32,
            planner::model::DType::F16 => ElementType::F16,
            planner::model::DType::Bf16 => ElementType::Bf16,
        }
    }
}

/// Handle of a tensor inside one store; cheap to copy and to look up (no hashing, no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorId(usize);

impl TensorId {
    /// Position of the tensor in its store (dense from 0), for sets and tables keyed by tensor.
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a store knows about a tensor without touching its elements.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// Full tensor name as in the checkpoint.
    pub name: String,
    /// Element type as stored.
    pub dtype: ElementType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// The file it is stored in (or a description of the source), for error messages.
    pub origin: String,
}

/// A source of named weight tensors.
pub trait WeightStore: Send + Sync {
    /// Where the tensors come from, for messages ("checkpoint DIR", "random weights, seed 7").
    fn origin(&self) -> &str;
    /// Resolves a tensor name once, at load time. Fails when the tensor is absent or stored in an
    /// element type the kernels cannot read.
    fn find(&self, name: &str) -> Result<TensorId>;
    /// Shape, dtype and origin of a resolved tensor.
    fn meta(&self, id: TensorId) -> &TensorMeta;
    /// The elements of a resolved tensor, borrowed from the store (no copy).
    fn data(&self, id: TensorId) -> WeightData<'_>;
    /// Bytes of all tensors the store holds.
    fn total_bytes(&self) -> u64;
    /// Brings the tensors into memory ahead of use (so that the first forward pass does not time
    /// page faults), reporting progress in bytes through `progress`.
    fn preload(&self, progress: &(dyn Fn(u64) + Sync)) {
        let _ = progress;
    }
    /// Like [`WeightStore::preload`] but only for the tensors `keep` accepts, so that tensors the
    /// policy puts on disk are never faulted in through the memory map (they are read with direct
    /// I/O instead and must not occupy the page cache).
    fn preload_only(
        &self,
        keep: &(dyn Fn(TensorId) -> bool + Sync),
        progress: &(dyn Fn(u64) + Sync),
    ) {
        let _ = keep;
        self.preload(progress)
    }
    /// Where a tensor's bytes are in a file (path, offset, length), for tensors that can be read
    /// straight from the checkpoint with direct I/O; None for tensors held only in memory.
    fn file_range(&self, id: TensorId) -> Option<(&Path, u64, usize)> {
        let _ = id;
        None
    }
    /// Repacks the bf16 matrices `ids` into the CPU kernels' panels
    /// ([`crate::kernels::pack_panels`]) in memory, in place of the store's copy, so that `data`
    /// serves `WeightData::Bf16Panels` for them from then on; other tensors are left as they are.
    /// Returns the bytes packed; `progress` receives them tensor by tensor. Only for runs whose
    /// products all run on the CPU: the GPU kernels and the direct-I/O disk reads take the
    /// nn.Linear layout.
    fn pack_panels(&mut self, ids: &[TensorId], progress: &(dyn Fn(u64) + Sync)) -> u64;
}

/// `owned` as panels ([`crate::kernels::pack_panels_in_place`]) when it is a bf16 matrix of
/// this shape, else unchanged; with the bytes packed (0 for unchanged), for
/// [`WeightStore::pack_panels`].
fn into_panels(owned: OwnedWeights, shape: &[usize]) -> (OwnedWeights, u64) {
    match (owned, shape) {
        (OwnedWeights::Bf16(w), &[n_out, n_in]) => {
            let panels =
                OwnedWeights::Bf16Panels(crate::kernels::pack_panels_in_place(w, n_out, n_in));
            let bytes = panels.as_bytes().len() as u64;
            (panels, bytes)
        }
        (other, _) => (other, 0),
    }
}

/// A zeroed buffer of `bytes` bytes of `dtype`'s element type, on whole huge pages as the decode
/// kernels want it, for the caller to overwrite.
fn zeroed_owned(dtype: ElementType, bytes: usize) -> OwnedWeights {
    use crate::kernels::HugePageBuf;
    match dtype {
        ElementType::F32 => OwnedWeights::F32(HugePageBuf::zeroed(bytes / 4)),
        ElementType::F16 => OwnedWeights::F16(HugePageBuf::zeroed(bytes / 2)),
        ElementType::Bf16 => OwnedWeights::Bf16(HugePageBuf::zeroed(bytes / 2)),
    }
}

/// Copies `bytes` into a buffer of `dtype`'s element type (aligned whatever `bytes` is), on
/// whole huge pages as the decode kernels want it.
fn owned_from_bytes(dtype: ElementType, bytes: &[u8]) -> OwnedWeights {
    let mut owned = zeroed_owned(dtype, bytes.len());
    owned.as_bytes_mut().copy_from_slice(bytes);
    owned
}

/// Where one checkpoint tensor's elements are.
enum Backing {
    /// In a memory map, at an offset aligned for its element type.
    Mapped {
        file: usize,
        start: usize,
        end: usize,
    },
    /// Copied out, because its offset in the file was not aligned for its element type.
    Copied(OwnedWeights),
}

/// A Hugging Face checkpoint (`model.safetensors`, or shards listed in
/// `model.safetensors.index.json`) memory-mapped in place.
pub struct SafetensorsStore {
    origin: String,
    files: Vec<(PathBuf, Mmap)>,
    metas: Vec<TensorMeta>,
    backing: Vec<Backing>,
    /// Copies of the memory-resident tensors on whole huge pages, made by `preload_only`; `data`
    /// serves these instead of the map, whose page cache is partly on 4 KiB pages.
    resident: Vec<std::sync::OnceLock<OwnedWeights>>,
    by_name: HashMap<String, TensorId>,
    /// Tensors present but stored in a dtype the kernels cannot read: name -> (dtype, file).
    unusable: HashMap<String, (String, String)>,
}

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

impl SafetensorsStore {
    /// Opens the checkpoint in a model directory: the shard index if there is one, else
    /// `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsStore> {
        let index = dir.join(SHARD_INDEX);
        let single = dir.join(SINGLE_FILE);
        let origin = format!("checkpoint {}", dir.display());
        if index.is_file() {
            let files = read_shard_index(&index)?;
            let store = Self::open_files(&files, origin)?;
            store.check_index(&index)?;
            Ok(store)
        } else if single.is_file() {
            Self::open_files(&[(single, None)], origin)
        } else {
            Err(ExecError::MissingFile {
                what: format!("weights ({SINGLE_FILE} or {SHARD_INDEX})"),
                path: single,
            })
        }
    }

    /// Opens one or more safetensors files as one store. `files` pairs each file with the tensor
    /// names the shard index assigns to it (None: take whatever the file holds).
    fn open_files(
        files: &[(PathBuf, Option<Vec<String>>)],
        origin: String,
    ) -> Result<SafetensorsStore> {
        let mut store = SafetensorsStore {
            origin,
            files: Vec::new(),
            metas: Vec::new(),
            backing: Vec::new(),
            resident: Vec::new(),
            by_name: HashMap::new(),
            unusable: HashMap::new(),
        };
        for (path, _) in files {
            let file = File::open(path).map_err(|e| ExecError::io(path, e))?;
            // SAFETY: the map is read-only; the checkpoint must not be truncated while the executor
            // runs (the same contract every mmap-based loader has).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ExecError::io(path, e))?;
            // Best effort: huge pages for the page cache need filesystem support; most
            // filesystems decline, and the map then streams on 4 KiB pages.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            store.add_file(path.clone(), map)?;
        }
        Ok(store)
    }

    /// Unmaps and evicts the pages of the tensors `keep` rejects (the disk-resident ones, read
    /// with direct I/O), except pages they share with kept tensors, and takes them out of the
    /// huge-page advice. Faulting in a kept tensor maps more than its own pages (2 MiB pages that
    /// straddle its ends, read-around), and khugepaged keeps collapsing such regions during the
    /// run: ~200 MiB for OPT-6.7B with 75% on disk (4% of the run's peak), none of it in the
    /// memory plan.
    fn release_skipped(&self, keep: &(dyn Fn(TensorId) -> bool + Sync)) {
        const PAGE: usize = 4096;
        let mut opened: HashMap<usize, Option<File>> = HashMap::new();
        for (i, b) in self.backing.iter().enumerate() {
            let Backing::Mapped { file, start, end } = b else {
                continue;
            };
            if keep(TensorId(i)) {
                continue;
            }
            let (lo, hi) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
            if hi <= lo {
                continue;
            }
            let (path, map) = &self.files[*file];
            // Out of the huge-page advice first: khugepaged would otherwise fill the 2 MiB
            // regions that straddle a kept tensor's ends again, page by page, during the run.
            #[cfg(target_os = "linux")]
            let _ = map.advise_range(memmap2::Advice::NoHugePage, lo, hi - lo);
            // SAFETY: the map is a read-only shared file mapping: dropped pages are read back from
            // the file on the next access (which the executor does not make; it reads these
            // tensors with direct I/O), so no data is lost and no reference is invalidated.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
            let f = opened.entry(*file).or_insert_with(|| File::open(path).ok());
            if let Some(f) = f {
                use std::os::fd::AsRawFd;
                // SAFETY: plain syscall on an open descriptor; advice only.
                unsafe {
                    libc::posix_fadvise(
                        f.as_raw_fd(),
                        lo as libc::off_t,
                        (hi - lo) as libc::off_t,
                        libc::POSIX_FADV_DONTNEED,
                    )
                };
            }
        }
    }

    fn add_file(&mut self, path: PathBuf, map: Mmap) -> Result<()> {
        let file_index = self.files.len();
        let shown = path.display().to_string();
        let corrupt = |message: String| ExecError::Safetensors {
            path: path.clone(),
            message,
        };
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
        let data_start = 8 + header_len;
        let mut names: Vec<_> = metadata.tensors().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in names {
            if self.by_name.contains_key(&name) || self.unusable.contains_key(&name) {
                return Err(corrupt(format!(
                    "tensor '{name}' appears in more than one file"
                )));
            }
            let dtype = match info.dtype {
                Dtype::F32 => ElementType::F32,
                Dtype::F16 => ElementType::F16,
                Dtype::BF16 => ElementType::Bf16,
                other => {
                    self.unusable
                        .insert(name, (format!("{other:?}"), shown.clone()));
                    continue;
                }
            };
            let start = data_start + info.data_offsets.0;
            let end = data_start + info.data_offsets.1;
            let bytes = &map[start..end];
            let backing = if (bytes.as_ptr() as usize).is_multiple_of(dtype.size()) {
                Backing::Mapped {
                    file: file_index,
                    start,
                    end,
                }
            } else {
                Backing::Copied(owned_from_bytes(dtype, bytes))
            };
            let id = TensorId(self.metas.len());
            self.metas.push(TensorMeta {
                name: name.clone(),
                dtype,
                shape: info.shape.clone(),
                origin: shown.clone(),
            });
            self.backing.push(backing);
            self.resident.push(std::sync::OnceLock::new());
            self.by_name.insert(name, id);
        }
        self.files.push((path, map));
        Ok(())
    }

    /// Every tensor the index promises must be in the file it names.
    fn check_index(&self, index: &Path) -> Result<()> {
        let files = read_shard_index(index)?;
        for (path, names) in files {
            for name in names.unwrap_or_default() {
                let found_in = self
                    .by_name
                    .get(&name)
                    .map(|id| self.metas[id.0].origin.clone())
                    .or_else(|| self.unusable.get(&name).map(|u| u.1.clone()));
                match found_in {
                    Some(f) if f == path.display().to_string() => {}
                    Some(f) => {
                        return Err(ExecError::ShardIndex {
                            path: index.to_path_buf(),
                            message: format!(
                                "tensor '{name}' is listed in {} but stored in {f}",
                                path.display()
                            ),
                        })
                    }
                    None => {
                        return Err(ExecError::ShardIndex {
                            path: index.to_path_buf(),
                            message: format!(
                                "tensor '{name}' is listed in {} but that file does not hold it",
                                path.display()
                            ),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Names of all usable tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.metas.iter().map(|m| m.name.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// Whether a tensor of that name is present (usable or not).
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name) || self.unusable.contains_key(name)
    }

    /// How many tensors `preload_only` copied onto huge pages (the rest are read from the map).
    pub fn resident_tensors(&self) -> usize {
        self.resident.iter().filter(|r| r.get().is_some()).count()
    }

    /// How many tensors had to be copied out of the map because of misalignment.
    pub fn copied_tensors(&self) -> usize {
        self.backing
            .iter()
            .filter(|b| matches!(b, Backing::Copied(_)))
            .count()
    }
}

/// Reads `model.safetensors.index.json`: the shard files, each with the tensor names it holds.
fn read_shard_index(index: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    let bad = |message: String| ExecError::ShardIndex {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| ExecError::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<(PathBuf, Option<Vec<String>>)> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("entry for '{name}' is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad(format!(
                "entry for '{name}' names '{file}', which is not a plain file name"
            )));
        }
        let path = dir.join(file);
        match files.iter_mut().find(|(p, _)| *p == path) {
            Some((_, names)) => names.get_or_insert_with(Vec::new).push(name.clone()),
            None => files.push((path, Some(vec![name.clone()]))),
        }
    }
    if files.is_empty() {
        return Err(bad("\"weight_map\" is empty".into()));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, _) in &files {
        if !path.is_file() {
            return Err(ExecError::MissingFile {
                what: format!("shard listed in {}", index.display()),
                path: path.clone(),
            });
        }
    }
    Ok(files)
}

impl WeightStore for SafetensorsStore {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn find(&self, name: &str) -> Result<TensorId> {
        if let Some(id) = self.by_name.get(name) {
            return Ok(*id);
        }
        if let Some((dtype, file)) = self.unusable.get(name) {
            return Err(ExecError::TensorDType {
                name: name.to_string(),
                file: file.clone(),
                found: dtype.clone(),
            });
        }
        Err(ExecError::MissingTensor {
            name: name.to_string(),
            origin: self.origin.clone(),
        })
    }

    fn meta(&self, id: TensorId) -> &TensorMeta {
        &self.metas[id.0]
    }

    fn data(&self, id: TensorId) -> WeightData<'_> {
        if let Some(copy) = self.resident[id.0].get() {
            return copy.view();
        }
        match &self.backing[id.0] {
            Backing::Copied(owned) => owned.view(),
            Backing::Mapped { file, start, end } => {
                let bytes = &self.files[*file].1[*start..*end];
                // Alignment was checked when the file was opened.
                match self.metas[id.0].dtype {
                    ElementType::F32 => WeightData::F32(bytemuck::cast_slice(bytes)),
                    ElementType::F16 => WeightData::F16(bytemuck::cast_slice(bytes)),
                    ElementType::Bf16 => WeightData::Bf16(bytemuck::cast_slice(bytes)),
                }
            }
        }
    }

    fn total_bytes(&self) -> u64 {
        self.metas
            .iter()
            .map(|m| (m.shape.iter().product::<usize>() * m.dtype.size()) as u64)
            .sum()
    }

    fn file_range(&self, id: TensorId) -> Option<(&Path, u64, usize)> {
        match &self.backing[id.0] {
            Backing::Mapped { file, start, end } => {
                Some((self.files[*file].0.as_path(), *start as u64, end - start))
            }
            Backing::Copied(_) => None,
        }
    }

    /// Reads each kept tensor from its file into a buffer of its own on whole huge pages, and
    /// drops the file's page cache for it: through the map, 29% of OPT-1.3B's weights were on
    /// 4 KiB pages (ext4 with large folios, Linux 6.18), which the decode kernels stream more
    /// slowly (docs/benchmarks.md, "Checkpoint weights on huge pages"), and the cache would
    /// otherwise hold a second copy of every resident weight outside the memory plan.
    fn preload_only(
        &self,
        keep: &(dyn Fn(TensorId) -> bool + Sync),
        progress: &(dyn Fn(u64) + Sync),
    ) {
        for (i, b) in self.backing.iter().enumerate() {
            let Backing::Mapped { file, start, end } = b else {
                continue;
            };
            if !keep(TensorId(i)) || self.resident[i].get().is_some() {
                continue;
            }
            let path = &self.files[*file].0;
            let copy = match read_resident(path, self.metas[i].dtype, *start, *end, progress) {
                Ok(copy) => copy,
                // Unreadable now (it was mapped a moment ago): serve it from the map instead,
                // read ahead through the page cache (the progress bar may then count some of
                // its bytes twice).
                Err(_) => {
                    let map = &self.files[*file].1;
                    let _ = map.advise_range(memmap2::Advice::WillNeed, *start, end - start);
                    progress((end - start) as u64);
                    continue;
                }
            };
            let _ = self.resident[i].set(copy);
        }
        self.release_skipped(&|id| self.resident[id.0].get().is_none() && keep(id));
    }

    fn pack_panels(&mut self, ids: &[TensorId], progress: &(dyn Fn(u64) + Sync)) -> u64 {
        let mut packed = 0;
        for &id in ids {
            // The resident copy `preload_only` made is packed in its own memory; a tensor only
            // in the map (or copied for alignment) gets a new buffer.
            let owned = match self.resident[id.0].take() {
                Some(owned) => owned,
                None => match self.data(id) {
                    WeightData::Bf16(w) => {
                        OwnedWeights::Bf16(crate::kernels::HugePageBuf::from_slice(w))
                    }
                    _ => continue,
                },
            };
            let (owned, bytes) = into_panels(owned, &self.metas[id.0].shape);
            progress(bytes);
            packed += bytes;
            self.resident[id.0] = std::sync::OnceLock::from(owned);
        }
        packed
    }

    fn preload(&self, progress: &(dyn Fn(u64) + Sync)) {
        self.preload_only(&|_| true, progress)
    }
}

/// Reads bytes `start..end` of the checkpoint file at `path` into a huge-page buffer of `dtype`
/// elements, in parallel chunks, then tells the kernel it may drop those file pages.
fn read_resident(
    path: &Path,
    dtype: ElementType,
    start: usize,
    end: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> std::io::Result<OwnedWeights> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 4 << 20;
    let file = File::open(path)?;
    let len = end - start;
    let mut owned = zeroed_owned(dtype, len);
    owned
        .as_bytes_mut()
        .par_chunks_mut(CHUNK)
        .enumerate()
        .try_for_each(|(k, chunk)| {
            file.read_exact_at(chunk, (start + k * CHUNK) as u64)?;
            progress(chunk.len() as u64);
            Ok::<_, std::io::Error>(())
        })?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open descriptor; advice only.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                start as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
    Ok(owned)
}

/// How a random tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform with mean 0 and this standard deviation.
    Uniform {
        /// Standard deviation.
        std: f32,
    },
    /// Every element equal to this value.
    Constant(f32),
}

/// Name, shape and fill of one random tensor.
#[derive(Debug, Clone)]
pub struct RandomTensor {
    /// Tensor name, as a checkpoint would have it.
    pub name: String,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// How its elements are drawn.
    pub init: Init,
}

/// Seeded random weights in memory, for benchmarking model sizes without a checkpoint.
///
/// Each tensor is filled in parallel in fixed-size chunks whose generator is seeded from (seed,
/// tensor, chunk), so the weights depend on the seed only, not on the number of threads.
pub struct RandomStore {
    origin: String,
    metas: Vec<TensorMeta>,
    data: Vec<OwnedWeights>,
    by_name: HashMap<String, TensorId>,
}

const RANDOM_CHUNK: usize = 1 << 16;

impl RandomStore {
    /// Generates every tensor of `layout` in `dtype`. `progress` receives bytes generated.
    pub fn generate(
        layout: &[RandomTensor],
        dtype: ElementType,
        seed: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> RandomStore {
        let origin = format!("random weights (seed {seed})");
        let mut store = RandomStore {
            origin: origin.clone(),
            metas: Vec::with_capacity(layout.len()),
            data: Vec::with_capacity(layout.len()),
            by_name: HashMap::new(),
        };
        for (t_index, t) in layout.iter().enumerate() {
            let len: usize = t.shape.iter().product();
            let tensor_seed = crate::rng::mix(seed, t_index as u64);
            let data = match dtype {
                ElementType::F32 => {
                    OwnedWeights::F32(fill(len, t.init, tensor_seed, progress, 4, |x| x))
                }
                ElementType::F16 => {
                    OwnedWeights::F16(fill(len, t.init, tensor_seed, progress, 2, f16::from_f32))
                }
                ElementType::Bf16 => {
                    OwnedWeights::Bf16(fill(len, t.init, tensor_seed, progress, 2, bf16::from_f32))
                }
            };
            store
                .by_name
                .insert(t.name.clone(), TensorId(store.metas.len()));
            store.metas.push(TensorMeta {
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
                origin: origin.clone(),
            });
            store.data.push(data);
        }
        store
    }
}

fn fill<T: Copy + Default + Send + Sync>(
    len: usize,
    init: Init,
    seed: u64,
    progress: &(dyn Fn(u64) + Sync),
    elem_bytes: u64,
    convert: impl Fn(f32) -> T + Sync,
) -> crate::kernels::HugePageBuf<T> {
    // On 2 MiB pages: batch-1 decode streams these at DRAM speed only if the hardware
    // prefetchers and the TLB are not restarted every 4 KiB (see `advise_huge_pages`).
    let mut v = crate::kernels::HugePageBuf::filled(len, T::default());
    match init {
        Init::Constant(c) => v.fill(convert(c)),
        Init::Uniform { std } => {
            // Uniform on [-a, a] has standard deviation a / sqrt(3).
            let a = std * 3f32.sqrt();
            v.par_chunks_mut(RANDOM_CHUNK)
                .enumerate()
                .for_each(|(chunk_index, chunk)| {
                    let mut rng = crate::rng::Rng::new(crate::rng::mix(seed, chunk_index as u64));
                    // Two 24-bit uniforms per 64 random bits: generation is bound by the RNG.
                    let to_unit =
                        |bits: u64| (bits & 0xFF_FFFF) as f32 * (1.0 / (1u32 << 24) as f32);
                    for pair in chunk.chunks_mut(2) {
                        let bits = rng.next_u64();
                        for (x, half_bits) in pair.iter_mut().zip([bits, bits >> 32]) {
                            *x = convert(a * (2.0 * to_unit(half_bits) - 1.0));
                        }
                    }
                    progress(chunk.len() as u64 * elem_bytes);
                });
        }
    }
    v
}

impl WeightStore for RandomStore {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn find(&self, name: &str) -> Result<TensorId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| ExecError::MissingTensor {
                name: name.to_string(),
                origin: self.origin.clone(),
            })
    }

    fn meta(&self, id: TensorId) -> &TensorMeta {
        &self.metas[id.0]
    }

    fn data(&self, id: TensorId) -> WeightData<'_> {
        self.data[id.0].view()
    }

    fn total_bytes(&self) -> u64 {
        self.metas
            .iter()
            .map(|m| (m.shape.iter().product::<usize>() * m.dtype.size()) as u64)
            .sum()
    }
    fn pack_panels(&mut self, ids: &[TensorId], progress: &(dyn Fn(u64) + Sync)) -> u64 {
        let mut packed = 0;
        for &id in ids {
            let owned =
                std::mem::replace(&mut self.data[id.0], OwnedWeights::F32(Vec::new().into()));
            let (owned, bytes) = into_panels(owned, &self.metas[id.0].shape);
            progress(bytes);
            packed += bytes;
            self.data[id.0] = owned;
        }
        packed
    }
}

/// Widens a 1-D tensor (a bias or a LayerNorm parameter) to f32.
pub fn to_f32_vec(data: &WeightData<'_>) -> Vec<f32> {
    match data {
        WeightData::F32(v) => v.to_vec(),
        WeightData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        WeightData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        WeightData::Bf16Panels(_) => unreachable!("only matrices are packed into panels"),
    }
}

/// Adds row `row` of a `[rows, width]` tensor to `out` (widening to f32): used for embedding
/// lookups, which read one row per token and so need no matrix kernel.
pub fn add_row(data: &WeightData<'_>, row: usize, width: usize, out: &mut [f32]) {
    let range = row * width..(row + 1) * width;
    match data {
        WeightData::F32(v) => out.iter_mut().zip(&v[range]).for_each(|(o, x)| *o += x),
        WeightData::F16(v) => out
            .iter_mut()
            .zip(&v[range])
            .for_each(|(o, x)| *o += x.to_f32()),
        WeightData::Bf16(v) => out
            .iter_mut()
            .zip(&v[range])
            .for_each(|(o, x)| *o += x.to_f32()),
        // The tied LM head, packed for the CPU kernels, is also the embedding table.
        WeightData::Bf16Panels(v) => out
            .iter_mut()
            .enumerate()
            .for_each(|(k, o)| *o += crate::kernels::panel_element(v, width, row, k).to_f32()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a safetensors file by hand so that tensor offsets can be deliberately misaligned
    /// (the official writers always align them).
    fn handmade_file(dir: &Path) -> PathBuf {
        let a: [u16; 1] = [f16::from_f32(1.5).to_bits()];
        let b: [f32; 3] = [1.0, -2.0, 3.25];
        let header = r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[3],"data_offsets":[2,14]}}"#;
        // Pad the header to 8 bytes so the data section starts aligned; "b" then sits at offset 2.
        let mut header = header.to_string();
        while !header.len().is_multiple_of(8) {
            header.push(' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(bytemuck::cast_slice(&a));
        bytes.extend_from_slice(bytemuck::cast_slice(&b));
        let path = dir.join(SINGLE_FILE);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn misaligned_tensor_is_copied_and_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        handmade_file(dir.path());
        let store = SafetensorsStore::open_dir(dir.path()).unwrap();
        assert_eq!(store.copied_tensors(), 1, "only 'b' is misaligned");
        let b = store.find("b").unwrap();
        match store.data(b) {
            WeightData::F32(v) => assert_eq!(v, &[1.0, -2.0, 3.25]),
            _ => panic!("b should be f32"),
        }
        let a = store.find("a").unwrap();
        match store.data(a) {
            WeightData::F16(v) => assert_eq!(v[0].to_f32(), 1.5),
            _ => panic!("a should be f16"),
        }
        assert_eq!(store.total_bytes(), 14);
    }

    #[test]
    fn preloaded_tensors_are_copied_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        // A tensor over 2 MiB, so its copy is a mapping of its own on huge pages.
        let n = (3 << 20) / 2 + 7;
        let values: Vec<u16> = (0..n)
            .map(|i| ((i * 2654435761usize) >> 7) as u16)
            .collect();
        let mut tensors = std::collections::HashMap::new();
        let big = bytemuck::cast_slice::<u16, u8>(&values).to_vec();
        let small = bytemuck::cast_slice::<u16, u8>(&values[..5]).to_vec();
        tensors.insert(
            "big".to_string(),
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![n], &big).unwrap(),
        );
        tensors.insert(
            "skipped".to_string(),
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![5], &small).unwrap(),
        );
        safetensors::serialize_to_file(&tensors, None, &dir.path().join(SINGLE_FILE)).unwrap();
        let store = SafetensorsStore::open_dir(dir.path()).unwrap();
        let big_id = store.find("big").unwrap();
        let skipped = store.find("skipped").unwrap();
        let done = std::sync::atomic::AtomicU64::new(0);
        store.preload_only(&|id| id == big_id, &|b| {
            done.fetch_add(b, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(
            store.resident_tensors(),
            1,
            "only the kept tensor is copied"
        );
        assert_eq!(
            done.into_inner(),
            big.len() as u64,
            "progress counts its bytes"
        );
        let WeightData::Bf16(got) = store.data(big_id) else {
            panic!("big should be bf16")
        };
        assert!(got.iter().zip(&values).all(|(g, v)| g.to_bits() == *v));
        assert_eq!(got.len(), n);
        // The skipped tensor is still served, from the map.
        let WeightData::Bf16(got) = store.data(skipped) else {
            panic!("skipped should be bf16")
        };
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            values[..5]
        );
    }

    #[test]
    fn random_store_is_seeded_and_has_the_requested_spread() {
        let layout = vec![
            RandomTensor {
                name: "w".into(),
                shape: vec![300, 1000],
                init: Init::Uniform { std: 0.5 },
            },
            RandomTensor {
                name: "g".into(),
                shape: vec![10],
                init: Init::Constant(1.0),
            },
        ];
        let one = RandomStore::generate(&layout, ElementType::F32, 9, &|_| {});
        let two = RandomStore::generate(&layout, ElementType::F32, 9, &|_| {});
        let other = RandomStore::generate(&layout, ElementType::F32, 10, &|_| {});
        let w = one.find("w").unwrap();
        let values = to_f32_vec(&one.data(w));
        assert_eq!(values, to_f32_vec(&two.data(w)));
        assert_ne!(values, to_f32_vec(&other.data(w)));
        let n = values.len() as f64;
        let mean = values.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
        assert_eq!(to_f32_vec(&one.data(one.find("g").unwrap())), vec![1.0; 10]);
        let bf = RandomStore::generate(&layout, ElementType::Bf16, 9, &|_| {});
        assert_eq!(bf.total_bytes(), (300 * 1000 + 10) * 2);
    }
}
