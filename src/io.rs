//! File IO shared by every stage: atomic writes, JSON and safetensors.
//!
//! A file is written under a temporary name beside its destination, synced,
//! then renamed, so a reader never sees half a file. Errors name the file.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::{Error, IoContext, Result};

/// Writes `safetensors` with the `format: pt` metadata transformers requires.
/// A CPU tensor's bytes are written from its own storage (Candle's writer
/// copies each tensor first: at Qwen2.5-0.5B a 544 MB table, which with the
/// allocator keeping freed memory, `device::tune_allocator`, stays resident
/// for the rest of the run); a GPU tensor's are copied to the host one at a time.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = tensors.iter().map(|(name, t)| (name.as_str(), Lent::of(t)));
    safetensors::serialize_to_file(data, Some(metadata), path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot write safetensors: {e}"),
    })
}

/// A tensor as the safetensors writer reads it: a contiguous CPU tensor's
/// storage held for reading while the file is written (the writer takes
/// every tensor before writing any). No op may write to these tensors on
/// another thread meanwhile: it would wait for the file, and a storage
/// listed twice would then wait for it too (Candle's lock is not
/// reentrant while a writer waits). The checkpoints write from the one
/// thread that trains, each storage once.
struct Lent<'a> {
    t: &'a Tensor,
    held: Option<(candle_core::StorageRef<'a>, (usize, usize))>,
}

impl<'a> Lent<'a> {
    fn of(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        let held = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(_), Some(span)) => Some((storage, span)),
            _ => None,
        };
        Self { t, held }
    }

    /// The bytes of a contiguous CPU tensor, from its storage.
    fn bytes(&self) -> Option<&[u8]> {
        use candle_core::CpuStorage as C;
        let (storage, (start, end)) = self.held.as_ref()?;
        let candle_core::Storage::Cpu(s) = &**storage else {
            return None;
        };
        let (start, end) = (*start, *end);
        fn raw<T>(v: &[T], start: usize, end: usize) -> Option<&[u8]> {
            let v = v.get(start..end)?;
            // SAFETY: the values are plain numbers (no padding, any bit
            // pattern readable as bytes), and the slice borrows them.
            Some(unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) })
        }
        match s {
            C::U8(v) => raw(v, start, end),
            C::U32(v) => raw(v, start, end),
            C::I16(v) => raw(v, start, end),
            C::I32(v) => raw(v, start, end),
            C::I64(v) => raw(v, start, end),
            C::BF16(v) => raw(v, start, end),
            C::F16(v) => raw(v, start, end),
            C::F32(v) => raw(v, start, end),
            C::F64(v) => raw(v, start, end),
            _ => None,
        }
    }
}

impl safetensors::View for Lent<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::View::dtype(&self.t)
    }
    fn shape(&self) -> &[usize] {
        self.t.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.bytes() {
            Some(b) => std::borrow::Cow::Borrowed(b),
            None => safetensors::View::data(&self.t),
        }
    }
    fn data_len(&self) -> usize {
        safetensors::View::data_len(&self.t)
    }
}

/// Reads every tensor of a safetensors file onto `device`.
///
/// The file is mapped, not read: its bytes are never a second copy of the
/// weights on the heap (which, with the allocator keeping freed memory,
/// `device::tune_allocator`, would stay resident for the whole run).
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let fail = |e: candle_core::Error| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot read safetensors: {}", Error::from(e)),
    };
    // SAFETY: the mapping is read while this function runs; a file changed
    // underneath by another process could give wrong values, not unsafety
    // in Rust's sense beyond what memmap2 documents.
    let map = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(fail)?;
    map.tensors()
        .into_iter()
        .map(|(name, view)| {
            use candle_core::safetensors::Load;
            Ok((name, view.load(device).map_err(fail)?))
        })
        .collect()
}

/// Writes a file atomically: to a temporary name beside it, synced, then renamed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    {
        use std::io::Write;
        let mut f = fs::File::create(&tmp).with_path(&tmp)?;
        f.write_all(bytes).with_path(&tmp)?;
        f.sync_all().with_path(&tmp)?;
    }
    fs::rename(&tmp, path).with_path(path)
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Msg(format!("{}: cannot serialize: {e}", path.display())))?;
    atomic_write(path, text.as_bytes())
}

/// Reads a JSON file into `T`, naming the file on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).with_path(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Syncs every file of `dir` to disk.
pub fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_path(dir)? {
        let path = entry.with_path(dir)?.path();
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_path(&path)?;
    }
    Ok(())
}

/// Appends one JSON line per value to `path` (created when missing).
pub fn append_jsonl(path: &Path, rows: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    use std::io::Write;
    let text: String = rows.into_iter().map(|r| format!("{r}\n")).collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_path(path)?;
    file.write_all(text.as_bytes()).with_path(path)
}
