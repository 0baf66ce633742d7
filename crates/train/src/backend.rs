//! Devices: the CPU always, wgpu and CUDA when built with their cargo features.

use clap::ValueEnum;

use crate::error::CliError;

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// Burn's NdArray backend on the CPU.
    Cpu,
    /// Burn's wgpu backend (Vulkan, Metal, DirectX or WebGPU); needs `--features wgpu`.
    Wgpu,
    /// Burn's CUDA backend; needs `--features cuda` and an NVIDIA driver.
    Cuda,
}

/// The CPU training backend. Balanced checkpointing keeps the outputs of compute-bound
/// operations (matmuls) for the backward pass and recomputes the memory-bound ones (element-wise
/// chains such as the sketch networks' activations) from them. Measured on 2 cores: the default
/// tiny run peaks at 30% less memory (647 vs 931 MiB resident) at 6% fewer tokens/s, one
/// learned-sketch layer (12 heads of 64) at 4k tokens at 42% less (1.72 vs 2.96 GiB) and up to
/// 24% slower;
/// results are identical, since recomputation repeats the same operations.
pub type CpuBackend = burn::backend::Autodiff<
    burn::backend::NdArray<f32>,
    burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing,
>;

/// Error for a device whose cargo feature was not compiled in.
#[cfg(not(all(feature = "wgpu", feature = "cuda")))]
pub fn not_built(kind: DeviceKind) -> CliError {
    let feature = match kind {
        DeviceKind::Cpu => "",
        DeviceKind::Wgpu => "wgpu",
        DeviceKind::Cuda => "cuda",
    };
    CliError::Device(format!(
        "this polysketch was built without {feature} support; rebuild with \
         `cargo build --release --features {feature}` (or `cargo run --release --features \
         {feature} -- ...`), or use --device cpu"
    ))
}

/// Checks that the CUDA driver library can be found before Burn tries to load it.
#[cfg(feature = "cuda")]
pub fn check_cuda_driver() -> Result<(), CliError> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(d.into());
    }
    if dirs.iter().any(|d| d.join("libcuda.so.1").exists()) {
        Ok(())
    } else {
        Err(CliError::Device(
            "no NVIDIA driver found (libcuda.so.1 is not in LD_LIBRARY_PATH or the system \
             library folders); install the driver or use --device cpu"
                .into(),
        ))
    }
}

/// Runs `$module::$job::<Backend>(device, args...)` on the chosen device.
#[macro_export]
macro_rules! on_device {
    ($kind:expr, $module:ident :: $job:ident, $($arg:expr),* $(,)?) => {{
        match $kind {
            $crate::backend::DeviceKind::Cpu => $module::$job::<$crate::backend::CpuBackend>(
                burn::backend::ndarray::NdArrayDevice::Cpu, $($arg),*),
            #[cfg(feature = "wgpu")]
            $crate::backend::DeviceKind::Wgpu => $module::$job::<burn::backend::Autodiff<burn::backend::Wgpu>>(
                burn::backend::wgpu::WgpuDevice::default(), $($arg),*),
            #[cfg(not(feature = "wgpu"))]
            $crate::backend::DeviceKind::Wgpu => Err($crate::backend::not_built($crate::backend::DeviceKind::Wgpu)),
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceKind::Cuda => $crate::backend::check_cuda_driver().and_then(|_| {
                $module::$job::<burn::backend::Autodiff<burn::backend::Cuda>>(
                    burn::backend::cuda::CudaDevice::default(), $($arg),*)
            }),
            #[cfg(not(feature = "cuda"))]
            $crate::backend::DeviceKind::Cuda => Err($crate::backend::not_built($crate::backend::DeviceKind::Cuda)),
        }
    }};
}
