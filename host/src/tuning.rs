//! Process-wide CPU tuning applied once at start-up, before any thread pool
//! exists: thread counts for candle's CPU kernels and glibc's allocator.
//!
//! Measured with perf on this 2-core box (train_step bench and `selma train
//! --full` on the ShapeWorld model): candle's GEMM re-reads /proc/cpuinfo for
//! the core count on every call unless RAYON_NUM_THREADS is set, its
//! element-wise barrier pool spin-waits for its workers (about half of all
//! cycles under load), and glibc hands every large tensor back to the kernel
//! with munmap so the next one page-faults it in again (sys time fell from
//! 9.3 s to 3.8 s of a 3-update run with the allocator settings below). Each
//! setting applies only when the user has not set the variable.

/// Applies the defaults (call first thing in `main`).
pub fn apply() {
    // GEMM on every core, element-wise ops inline (no spinning pool).
    selma_diffusion::tuning::configure_cpu_threads(None, Some(1));
    tune_malloc();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // Keep freed tensor buffers (up to 32 MiB each) in the heap for reuse
    // instead of returning them to the kernel after every op.
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
