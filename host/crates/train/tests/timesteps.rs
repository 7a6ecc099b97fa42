//! The training timestep range (`min_timestep`, `max_timestep`, kohya's
//! names) reaches the trainer's draws, and ranges that cannot work are
//! errors naming the setting.

use selma_train::trainer::Trainer;

use crate::common::config_in;

/// The smallest and largest timestep drawn over `updates` updates.
fn drawn(t: &mut Trainer, updates: usize) -> (usize, usize) {
    (0..updates).fold((usize::MAX, 0), |(lo, hi), _| {
        let s = t.train_step().unwrap();
        (lo.min(s.timesteps.0), hi.max(s.timesteps.1))
    })
}

#[test]
fn timestep_range_bounds_every_draw_of_the_trainer() {
    let d = tempfile::tempdir().unwrap();
    // The whole schedule by default: 24 draws of 1000 reach below 700.
    let mut t = Trainer::new(config_in(d.path(), "all.safetensors")).unwrap();
    let (lo, hi) = drawn(&mut t, 6);
    assert!(lo < 700 && hi < 1000, "{lo}..={hi}");

    let mut cfg = config_in(d.path(), "high.safetensors");
    cfg.min_timestep = 700;
    cfg.max_timestep = Some(760);
    let mut t = Trainer::new(cfg).unwrap();
    let (lo, hi) = drawn(&mut t, 6);
    assert!(lo >= 700 && hi < 760, "{lo}..={hi}");

    // One timestep only; the upper bound alone.
    let mut cfg = config_in(d.path(), "one.safetensors");
    cfg.min_timestep = 500;
    cfg.max_timestep = Some(501);
    let mut t = Trainer::new(cfg).unwrap();
    assert_eq!(drawn(&mut t, 2), (500, 500));
    let mut cfg = config_in(d.path(), "low.safetensors");
    cfg.max_timestep = Some(50);
    let mut t = Trainer::new(cfg).unwrap();
    assert!(drawn(&mut t, 3).1 < 50);
}

#[test]
fn impossible_timestep_ranges_are_errors_naming_the_setting() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config_in(d.path(), "e.safetensors");
    cfg.min_timestep = 800;
    cfg.max_timestep = Some(800);
    let e = Trainer::new(cfg).err().unwrap().to_string();
    assert!(e.contains("--min-timestep 800"), "{e}");
    let mut cfg = config_in(d.path(), "e.safetensors");
    cfg.max_timestep = Some(2000);
    let e = format!("{:#}", Trainer::new(cfg).err().unwrap());
    assert!(e.contains("max_timestep 2000") && e.contains("1000"), "{e}");
    let mut cfg = config_in(d.path(), "e.safetensors");
    cfg.min_timestep = 1000;
    let e = format!("{:#}", Trainer::new(cfg).err().unwrap());
    assert!(e.contains("min_timestep 1000"), "{e}");
}
