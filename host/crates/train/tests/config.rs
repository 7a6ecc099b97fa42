//! Training configuration: SELMA's recipe as defaults, TOML files, errors
//! naming the offending key.

use selma_train::trainer::TrainConfig;

#[test]
fn defaults_are_the_selma_recipe() {
    let c = TrainConfig::default();
    assert_eq!((c.rank, c.alpha), (128, 128.0));
    assert_eq!(c.targets, ["to_q", "to_k", "to_v", "to_out.0"]);
    assert_eq!((c.batch, c.grad_accum, c.steps), (16, 4, 5000));
    assert_eq!(
        (c.lr, c.lr_schedule.as_str(), c.warmup_steps),
        (3e-4, "constant", 0)
    );
    assert_eq!((c.adam.beta1, c.adam.beta2, c.adam.eps), (0.9, 0.999, 1e-8));
    assert_eq!((c.adam.weight_decay, c.max_grad_norm), (1e-2, 1.0));
    assert!(c.random_flip);
    assert_eq!(c.format, "peft");
}

#[test]
fn toml_overrides_some_keys_and_rejects_unknown_ones() {
    let c = TrainConfig::from_toml_str(
        "model = \"m\"\ndata = \"d\"\nrank = 4\ntargets = [\"to_q\"]\n[adam]\nbeta1 = 0.8\nbeta2 = 0.99\neps = 1e-6\nweight_decay = 0.0\n",
    )
    .unwrap();
    assert_eq!(c.rank, 4);
    assert_eq!(c.alpha, 128.0);
    assert_eq!(c.targets, ["to_q"]);
    assert_eq!(c.adam.beta1, 0.8);
    assert_eq!(
        c.run_dir(),
        std::path::PathBuf::from("expert.safetensors.run")
    );
    let e = TrainConfig::from_toml_str("rnak = 4\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rnak"), "{e}");
    let e = TrainConfig::from_toml_str("rank = \"big\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank") && e.contains("line 1"), "{e}");
}
