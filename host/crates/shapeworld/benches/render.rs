//! Bench binary: how fast ShapeWorld scenes are sampled and rendered, and
//! how long writing a 100k-scene dataset takes (PNG files + metadata.jsonl).
//! `cargo bench -p selma-shapeworld` (release profile).

use selma_shapeworld::{dataset_scene, encode_png, write_dataset, DatasetOptions, SampleOptions};
use std::time::Instant;

fn main() {
    let n = 100_000u64;
    let opts = SampleOptions::default();
    let t = Instant::now();
    let mut lit = 0usize;
    for i in 0..n {
        let (scene, _) = dataset_scene(1, i, &opts);
        lit += scene.render().iter().filter(|&&b| b != 240).count();
    }
    let sample_render = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut bytes = 0usize;
    for i in 0..10_000u64 {
        let (scene, _) = dataset_scene(1, i, &opts);
        bytes += encode_png(&scene.render()).unwrap().len();
    }
    let png = t.elapsed().as_secs_f64() / 10_000.0;
    println!(
        "sample+render: {:.2} us/scene ({n} scenes in {sample_render:.2} s; {lit} lit bytes)",
        sample_render / n as f64 * 1e6
    );
    println!(
        "sample+render+PNG encode: {:.2} us/scene (mean PNG {} bytes)",
        png * 1e6,
        bytes / 10_000
    );
    let dir = std::env::temp_dir().join(format!("selma-shapeworld-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for threads in [1, 2] {
        let out = dir.join(format!("t{threads}"));
        let t = Instant::now();
        let s = write_dataset(
            &out,
            &DatasetOptions {
                count: n as usize,
                seed: 1,
                threads,
                ..DatasetOptions::default()
            },
        )
        .unwrap();
        println!(
            "write_dataset {} scenes, {threads} thread(s): {:.2} s",
            s.count,
            t.elapsed().as_secs_f64()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
