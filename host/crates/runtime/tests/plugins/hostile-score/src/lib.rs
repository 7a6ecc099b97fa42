//! Test-only image filter that keeps every image with the score given by
//! its `score` parameter, in or out of [0, 1] (the SDK and the host must
//! refuse scores outside it; a plugin written from outside found that the
//! SDK clamped them silently while NaN was an error).

use selma_plugin_sdk::{
    params, Image, ImageFilter, ImageVerdict, Metadata, Params, Plugin, PluginKind,
};

struct Score;

impl Plugin for Score {
    fn metadata() -> Metadata {
        Metadata {
            name: "hostile-score".into(),
            version: "0.1.0".into(),
            kind: PluginKind::ImageFilter,
            description: "Returns the score it is given (test only).".into(),
            help: String::new(),
            params: vec![params::number("score", 0.5, "the score returned")],
        }
    }
}

impl ImageFilter for Score {
    fn check(_img: &Image, _prompt: String, params: Params) -> Result<ImageVerdict, String> {
        Ok(ImageVerdict {
            keep: true,
            score: params.f32("score")?,
            reason: None,
        })
    }
}

selma_plugin_sdk::export!(image_filter: Score);
