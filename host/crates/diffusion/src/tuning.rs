//! Process-wide CPU thread policy for candle's kernels: the GEMM thread
//! count and the size of the element-wise pool, fixed once at start-up.

/// Fixes candle's CPU thread counts for this process and returns the gemm
/// thread count. Call it first thing in `main`, before any tensor work and
/// before other threads exist (it sets environment variables).
///
/// Without `RAYON_NUM_THREADS`, candle 0.11 asks `num_cpus::get_physical()`
/// on every CPU matmul on machines with uniform cores, which re-reads and
/// parses `/proc/cpuinfo` each time (~15% of a LoRA training step here).
/// `elementwise` sets `CANDLE_NUM_THREADS`, the size of candle's spinning
/// barrier pool for element-wise ops (1 = run them on the calling thread).
/// Variables the user already set are kept.
pub fn configure_cpu_threads(gemm: Option<usize>, elementwise: Option<usize>) -> usize {
    let env_threads = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    let n = env_threads("RAYON_NUM_THREADS").unwrap_or_else(|| {
        let n = gemm.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        n
    });
    if env_threads("CANDLE_NUM_THREADS").is_none() {
        if let Some(e) = elementwise {
            std::env::set_var("CANDLE_NUM_THREADS", e.max(1).to_string());
        }
    }
    n
}
