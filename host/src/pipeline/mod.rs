//! `selma run`: the whole SELMA pipeline from one TOML file (config, run
//! directory with per-stage manifests, resume, sharding, status).
