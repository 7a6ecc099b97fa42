//! ShapeWorld: procedural scenes of coloured shapes with captions from a
//! small grammar, written as an image folder with `metadata.jsonl`.
