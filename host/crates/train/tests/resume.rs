//! Must-show 4: 20 updates straight == 10 updates, checkpoint, resume, 10 more
//! (LoRA weights, AdamW moments, RNG and data order bit-identical on CPU);
//! checkpoints are atomic and the output LoRA loads back.

use crate::common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use selma_train::trainer::Trainer;

fn bits(m: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, t)| {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), x.iter().map(|f| f.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn twenty_steps_equal_ten_plus_resume_plus_ten() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::dataset(dir.path(), 3);

    // Straight run.
    let cfg_a = common::small_config(&model, &data, &dir.path().join("a/expert.safetensors"));
    let mut a = Trainer::new(cfg_a.clone()).unwrap();
    let mut losses = vec![];
    a.run(|s| losses.push(s.loss)).unwrap();
    assert_eq!(a.state.step, 20);
    assert_eq!(losses.len(), 20);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0));

    // Interrupted run: 10 updates, then a fresh process-like trainer resumes.
    let mut cfg_b = common::small_config(&model, &data, &dir.path().join("b/expert.safetensors"));
    cfg_b.steps = 10;
    let mut b = Trainer::new(cfg_b.clone()).unwrap();
    b.run(|_| {}).unwrap();
    drop(b);
    let run_b = cfg_b.run_dir();
    assert!(run_b.join("checkpoint-10/state.json").is_file());
    // No temporary checkpoint folder is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&run_b)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
    cfg_b.steps = 20;
    let mut c = Trainer::new(cfg_b.clone()).unwrap();
    // Before resuming, the fresh trainer differs from the checkpointed one.
    c.resume(&run_b).unwrap();
    assert_eq!(c.state.step, 10);
    let mut losses_c = vec![];
    c.run(|s| losses_c.push(s.loss)).unwrap();

    assert_eq!(c.state.step, 20);
    assert_eq!(c.opt.step, a.opt.step);
    assert_eq!(c.state, a.state, "RNG / data order differ after resume");
    assert_eq!(
        losses_c.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        losses[10..].iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    let (ta, tc) = (a.state_tensors(), c.state_tensors());
    assert_eq!(ta.len(), c.lora.layers.len() * 6);
    assert!(
        bits(&ta) == bits(&tc),
        "LoRA weights or AdamW moments differ"
    );
    // Training moved B away from zero.
    let up = &a.lora.layers[0].up;
    let mx = up.as_tensor().abs().unwrap().max_all().unwrap();
    assert!(mx.to_scalar::<f32>().unwrap() > 0.0);

    // The output file loads back with rank, alpha and every layer.
    let f = selma_lora::LoraFile::load(&cfg_a.out, &Device::Cpu).unwrap();
    assert_eq!(f.layers.len(), a.lora.layers.len());
    let l0 = &a.lora.layers[0];
    let fl = &f.layers[&format!("unet.{}", l0.path)];
    assert_eq!(fl.rank(), 4);
    assert_eq!(fl.alpha, 4.0);
    let d: Vec<f32> = fl.down.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = l0
        .down
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(d, w);
    // The loss log has one line per update of the straight run.
    let log = std::fs::read_to_string(cfg_a.run_dir().join("loss.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 20);
}

#[test]
fn resume_rejects_changed_settings() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::dataset(dir.path(), 2);
    let mut cfg = common::small_config(&model, &data, &dir.path().join("x.safetensors"));
    cfg.steps = 1;
    cfg.grad_accum = 1;
    Trainer::new(cfg.clone()).unwrap().run(|_| {}).unwrap();
    let mut other = cfg.clone();
    other.rank = 8;
    other.alpha = 8.0;
    let mut t = Trainer::new(other).unwrap();
    let e = format!("{:#}", t.resume(&cfg.run_dir()).unwrap_err());
    assert!(e.contains("rank") && e.contains("checkpoint-1"), "{e}");
    let e = format!("{:#}", t.resume(&dir.path().join("nowhere")).unwrap_err());
    assert!(e.contains("nowhere"), "{e}");
}
