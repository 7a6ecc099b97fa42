//! Warm start of what `selma plugins list` does: create a `Runtime` and read
//! every bundled plugin's metadata with the compiled-component cache warm
//! (deserialize + instantiate + one `metadata` call per plugin).
//! Run: `cargo bench -p selma-runtime --bench warm_start`.

use criterion::{criterion_group, criterion_main, Criterion};
use selma_runtime::{Runtime, RuntimeConfig};

fn config(cache: &std::path::Path) -> RuntimeConfig {
    RuntimeConfig {
        cache_dir: Some(cache.to_path_buf()),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    }
}

fn warm_start(c: &mut Criterion) {
    let cache = tempfile::tempdir().unwrap();
    // Fill the cache once (cold start: compiles every component).
    let n = Runtime::new(config(cache.path()))
        .unwrap()
        .list_bundled()
        .unwrap()
        .len();
    c.bench_function(
        &format!("runtime_new_and_list_{n}_bundled_warm_cache"),
        |b| {
            b.iter(|| {
                let rt = Runtime::new(config(cache.path())).unwrap();
                rt.list_bundled().unwrap()
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = warm_start
}
criterion_main!(benches);
