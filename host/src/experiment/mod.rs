//! ShapeWorld experiments: verifier accuracy of a model (and LoRA variants)
//! per skill on seeded held-out prompts, with intervals and paired tests.
