//! Choosing the device and dtype from `--device` and `--dtype`.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Sets the number of CPU threads the tensor ops use (0 leaves the default:
/// every core, or RAYON_NUM_THREADS). Candle's matmuls read RAYON_NUM_THREADS
/// on every call and rayon's pool reads it when first used, so call this
/// before any tensor work.
pub fn set_threads(n: usize) {
    // Several ranks on one node share its cores: 0 means the node's cores
    // divided by its ranks (unless RAYON_NUM_THREADS says otherwise), or,
    // when the launcher bound this rank to fewer cores (mpirun's default
    // binding), those cores.
    let world = crate::dist::world();
    let n = match (n, world.local_size, std::env::var("RAYON_NUM_THREADS")) {
        (0, ranks, Err(_)) if ranks > 1 => {
            let mine = std::thread::available_parallelism().map_or(1, |c| c.get());
            match online_cpus() {
                Some(node) if mine >= node => (node / ranks).max(1),
                _ => mine,
            }
        }
        _ => n,
    };
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        #[cfg(feature = "mkl")]
        // SAFETY: sets MKL's global thread count; no MKL call runs yet.
        unsafe {
            MKL_Set_Num_Threads(n as std::ffi::c_int)
        };
    }
}

/// The node's online CPUs, whatever this process's affinity.
fn online_cpus() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        (n > 0).then_some(n as usize)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

#[cfg(feature = "mkl")]
extern "C" {
    /// MKL's thread count for its products (Intel OpenMP threads), linked
    /// from libmkl_intel_lp64 by candle-core's `mkl` feature.
    fn MKL_Set_Num_Threads(n: std::ffi::c_int);
}

/// The number of CPU threads the tensor ops use.
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Keeps freed memory in the process instead of giving it back to the kernel.
///
/// Training allocates and frees tensors of many megabytes at every op. glibc
/// serves those with fresh mmap()s and unmaps them on free, so every new
/// tensor is page-faulted in and zeroed by the kernel again (a third of a
/// GPT-2-small reward step; docs/benchmarks-history.md, "Design measurements").
/// Elsewhere a no-op.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before
    // the program allocates tensors.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1); // -1: never trim the heap
    }
}

/// Gives the memory freed so far back to the kernel (glibc's malloc_trim),
/// which [`tune_allocator`] otherwise keeps: for a one-off phase that freed
/// gigabytes the run will not reuse, such as `bench` writing its random
/// models (a 3B model's 12 GB would stay resident through the timed steps).
/// Elsewhere a no-op.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resolves `auto|cpu|cuda[:N]|metal[:N]` to a device. `auto` picks CUDA,
/// then Metal, then the CPU, and the returned text says which and why.
pub fn resolve_device(spec: &str) -> Result<(Device, String)> {
    let spec = spec.trim();
    let (kind, ordinal) = parse_spec(spec)?;
    // Data parallelism: each rank of a node takes the GPU of its local rank
    // unless the spec names one.
    let ordinal = match spec.contains(':') {
        true => ordinal,
        false => crate::dist::world().local_rank,
    };
    match kind {
        "auto" => Ok(auto_device(ordinal)),
        "cpu" => Ok((Device::Cpu, "cpu".into())),
        "cuda" => open_gpu(
            spec,
            "cuda",
            cfg!(feature = "cuda"),
            ordinal,
            Device::new_cuda,
        ),
        "metal" => open_gpu(
            spec,
            "metal",
            cfg!(feature = "metal"),
            ordinal,
            Device::new_metal,
        ),
        _ => unreachable!("parse_spec accepts only the kinds above"),
    }
}

fn open_gpu(
    spec: &str,
    kind: &str,
    built_with_it: bool,
    ordinal: usize,
    open: fn(usize) -> candle_core::Result<Device>,
) -> Result<(Device, String)> {
    if !built_with_it {
        return Err(Error::Device {
            spec: spec.into(),
            message: format!("this binary was built without {kind}; rebuild with `cargo build --release --features {kind}` (see docs/gpu.md)"),
        });
    }
    let dev = open(ordinal).map_err(|e| Error::Device {
        spec: spec.into(),
        message: format!("cannot open the GPU: {}", Error::from(e)),
    })?;
    Ok((dev, format!("{kind}:{ordinal}")))
}

/// The device spec the test suites compute on: `CANDLE_RLHF_TEST_DEVICE`
/// (any spec `--device` takes), else `auto`, so that a build with
/// `--features cuda` runs them on the GPU where one answers and on the CPU
/// elsewhere (scripts/gpu_run.sh runs both).
pub fn test_device_spec() -> String {
    std::env::var("CANDLE_RLHF_TEST_DEVICE").unwrap_or_else(|_| "auto".into())
}

/// The device of [`test_device_spec`]; panics on a bad spec (tests only).
pub fn test_device() -> Device {
    match resolve_device(&test_device_spec()) {
        Ok((dev, _)) => dev,
        Err(e) => panic!("CANDLE_RLHF_TEST_DEVICE: {e}"),
    }
}

/// Checks the syntax of a device spec without opening the device.
pub fn parse_spec(spec: &str) -> Result<(&str, usize)> {
    let spec = spec.trim();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n: usize = n.parse().map_err(|_| Error::Device {
                spec: spec.into(),
                message: "the device index after ':' must be a number, as in cuda:0".into(),
            })?;
            (k, n)
        }
        None => (spec, 0),
    };
    match kind {
        "auto" | "cpu" | "cuda" | "metal" => Ok((kind, ordinal)),
        _ => Err(Error::Device {
            spec: spec.into(),
            message: "expected auto, cpu, cuda, cuda:N, metal or metal:N".into(),
        }),
    }
}

fn auto_device(cuda_ordinal: usize) -> (Device, String) {
    if candle_core::utils::cuda_is_available() {
        if let Ok(dev) = Device::new_cuda(cuda_ordinal) {
            return (dev, format!("cuda:{cuda_ordinal} (auto: CUDA found)"));
        }
    }
    if candle_core::utils::metal_is_available() {
        if let Ok(dev) = Device::new_metal(cuda_ordinal) {
            return (dev, "metal:0 (auto: Metal found)".into());
        }
    }
    let why = if cfg!(any(feature = "cuda", feature = "metal")) {
        "no usable GPU"
    } else {
        "built without cuda/metal features"
    };
    (Device::Cpu, format!("cpu (auto: {why})"))
}

/// The dtype names accepted by `--dtype` and `run.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    F32,
    Bf16,
    F16,
}

impl DTypeName {
    pub fn dtype(self) -> DType {
        match self {
            DTypeName::F32 => DType::F32,
            DTypeName::Bf16 => DType::BF16,
            DTypeName::F16 => DType::F16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_resolve_and_bad_specs_are_named() {
        assert!(resolve_device("cpu").unwrap().0.is_cpu());
        let (_, said) = resolve_device("auto").unwrap();
        assert!(said.contains("auto"), "{said}");
        let err = resolve_device("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        let err = resolve_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("must be a number"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = resolve_device("cuda").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}

/// The CPU's model name, the vector extensions it reports that matter to the
/// matrix products (from /proc/cpuinfo), and which product path Candle's
/// CPU matmuls take on it: a BLAS when the build has one, else the gemm
/// crate's kernels for the widest extension the CPU has (chosen at run time).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuInfo {
    pub model: String,
    pub vector_extensions: Vec<String>,
    pub product_path: String,
}

/// The extensions reported, in this order, when the CPU has them.
const VECTOR_FLAGS: &[&str] = &[
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
];

/// What this machine is, for benchmark reports.
pub fn cpu_info() -> CpuInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags: Vec<String> = field("flags")
        .map(|f| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let vector_extensions = VECTOR_FLAGS
        .iter()
        .filter(|f| flags.iter().any(|g| g == *f))
        .map(|f| f.to_string())
        .collect();
    CpuInfo {
        model,
        vector_extensions,
        product_path: product_path(),
    }
}

/// Which kernels Candle's CPU matmuls run here.
fn product_path() -> String {
    if cfg!(feature = "mkl") {
        return "BLAS (MKL)".into();
    }
    if cfg!(feature = "accelerate") {
        return "BLAS (Accelerate)".into();
    }
    #[cfg(target_arch = "x86_64")]
    {
        // gemm-f32 is built with its x86-v4 kernels (Cargo.toml) and picks the
        // widest the CPU runs, as these checks do.
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "gemm AVX-512".into();
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "gemm AVX2+FMA".into();
        }
        "gemm SSE2".into()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        format!("gemm ({})", std::env::consts::ARCH)
    }
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn the_product_path_follows_the_cpus_extensions() {
        let info = cpu_info();
        assert!(!info.model.is_empty());
        let has = |f: &str| info.vector_extensions.iter().any(|e| e == f);
        if cfg!(any(feature = "mkl", feature = "accelerate")) {
            assert!(info.product_path.starts_with("BLAS"));
        } else if cfg!(target_arch = "x86_64") && std::path::Path::new("/proc/cpuinfo").exists() {
            let want = if has("avx512f") {
                "gemm AVX-512"
            } else if has("avx2") && has("fma") {
                "gemm AVX2+FMA"
            } else {
                "gemm SSE2"
            };
            assert_eq!(info.product_path, want, "{info:?}");
        }
    }
}
