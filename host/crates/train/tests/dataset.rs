//! Dataset layouts, preprocessing and clear errors on corrupt datasets.

use std::path::Path;

use candle_core::Device;
use selma_train::dataset::{
    choose_variant, load_rgb, prepare, resized_size, Crop, Dataset, Variant,
};
use selma_train::rng::TrainRng;

fn png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    img.save(path).unwrap();
}

fn meta_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("a.png"), 8, 8, |_, _| [255, 0, 0]);
    png(&d.path().join("b.png"), 8, 8, |_, _| [0, 255, 0]);
    std::fs::write(
        d.path().join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"a red square\"}\n\n\
         {\"file_name\": \"b.png\", \"text\": \"a green square\"}\n",
    )
    .unwrap();
    d
}

#[test]
fn metadata_jsonl_and_caption_files_are_read() {
    let d = meta_dir();
    let ds = Dataset::open(d.path(), false).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.samples[1].text, "a green square");
    assert_eq!(ds.samples[1].image, d.path().join("b.png"));

    let d2 = tempfile::tempdir().unwrap();
    png(&d2.path().join("x.png"), 4, 4, |_, _| [1, 2, 3]);
    std::fs::write(d2.path().join("x.txt"), "  a blue thing\n").unwrap();
    let ds = Dataset::open(d2.path(), false).unwrap();
    assert_eq!(ds.samples.len(), 1);
    assert_eq!(ds.samples[0].text, "a blue thing");
}

fn err_of(dir: &Path) -> String {
    format!("{:#}", Dataset::open(dir, false).unwrap_err())
}

#[test]
fn corrupt_datasets_error_naming_the_file_or_skip_with_warning() {
    // missing image
    let d = meta_dir();
    std::fs::remove_file(d.path().join("b.png")).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("b.png") && e.contains("not found"), "{e}");
    assert!(e.contains("metadata.jsonl line 3"), "{e}");
    let ds = Dataset::open(d.path(), true).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.warnings.len(), 1);
    assert!(ds.warnings[0].contains("b.png"), "{:?}", ds.warnings);

    // unreadable image
    let d = meta_dir();
    std::fs::write(d.path().join("a.png"), b"this is not a png").unwrap();
    let e = err_of(d.path());
    assert!(e.contains("a.png") && e.contains("unreadable"), "{e}");
    assert_eq!(Dataset::open(d.path(), true).unwrap().len(), 1);

    // missing caption in metadata.jsonl
    let d = meta_dir();
    std::fs::write(
        d.path().join("metadata.jsonl"),
        "{\"file_name\": \"a.png\"}\n{\"file_name\": \"b.png\", \"text\": \"t\"}\n",
    )
    .unwrap();
    let e = err_of(d.path());
    assert!(e.contains("a.png") && e.contains("caption"), "{e}");

    // missing caption file
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("x.png"), 4, 4, |_, _| [1, 2, 3]);
    png(&d.path().join("y.png"), 4, 4, |_, _| [1, 2, 3]);
    std::fs::write(d.path().join("x.txt"), "x").unwrap();
    let e = err_of(d.path());
    assert!(e.contains("y.txt") && e.contains("y.png"), "{e}");
    let ds = Dataset::open(d.path(), true).unwrap();
    assert_eq!(ds.len(), 1);
    assert!(ds.warnings[0].contains("y.txt"));

    // nothing usable at all
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("x.png"), 4, 4, |_, _| [1, 2, 3]);
    let e = format!("{:#}", Dataset::open(d.path(), true).unwrap_err());
    assert!(e.contains("no usable"), "{e}");
    // not a folder
    let e = err_of(&d.path().join("nope"));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
}

#[test]
fn resize_center_crop_and_flip() {
    assert_eq!(resized_size(8, 4, 2), (4, 2));
    assert_eq!(resized_size(3, 6, 3), (3, 6));
    // A 6x3 image, shorter side already 3: center crop x = round((6-3)/2) = 2 (torchvision rounds 1.5 -> 2).
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("g.png");
    png(&p, 6, 3, |x, y| [(x * 40) as u8, (y * 100) as u8, 255]);
    let img = load_rgb(&p).unwrap();
    let mut rng = TrainRng::new(0);
    let v = choose_variant(6, 3, 3, Crop::Center, false, &mut rng);
    assert_eq!(
        v,
        Variant {
            x: 2,
            y: 0,
            flip: false
        }
    );
    let t = prepare(&img, 3, v, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 3, 3]);
    let r = t.get(0).unwrap().to_vec2::<f32>().unwrap();
    // red channel row 0 = x*40 for x = 2, 3, 4 -> 80, 120, 160 scaled to [-1, 1]
    let want: Vec<f32> = [80f32, 120.0, 160.0]
        .iter()
        .map(|v| v / 127.5 - 1.0)
        .collect();
    assert_eq!(r[0], want);
    let g = t.get(1).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g[2][0], 200.0 / 127.5 - 1.0);
    let flipped = prepare(&img, 3, Variant { flip: true, ..v }, &Device::Cpu).unwrap();
    let rf = flipped.get(0).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(rf[0], vec![want[2], want[1], want[0]]);
    // Random crops stay inside and vary; flips happen about half the time.
    let mut xs = std::collections::BTreeSet::new();
    let mut flips = 0;
    for _ in 0..200 {
        let v = choose_variant(10, 4, 4, Crop::Random, true, &mut rng);
        assert!(v.x <= 6 && v.y == 0);
        xs.insert(v.x);
        flips += v.flip as usize;
    }
    assert_eq!(xs.len(), 7);
    assert!((60..140).contains(&flips), "{flips}");
    // Downscaling keeps a uniform image uniform.
    let q = d.path().join("u.png");
    png(&q, 16, 8, |_, _| [255, 255, 255]);
    let t = prepare(
        &load_rgb(&q).unwrap(),
        4,
        Variant {
            x: 2,
            y: 0,
            flip: false,
        },
        &Device::Cpu,
    )
    .unwrap();
    let m = t
        .min_keepdim(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap();
    assert_eq!(m.to_scalar::<f32>().unwrap(), 1.0);
}
