//! The `degenerate` image filter: rejects images a broken sampler produces
//! (near-constant, all black, or with non-finite decoder output), from the
//! host's fused per-channel statistics, without copying pixels.

use selma_plugin_sdk::{
    params, ChannelStats, Image, ImageFilter, ImageVerdict, Metadata, Params, Plugin, PluginKind,
};

/// Channel std (0..255 scale) at which the score saturates to 1.
pub const FULL_SCORE_STD: f32 = 64.0;

struct Degenerate;

impl Plugin for Degenerate {
    fn metadata() -> Metadata {
        Metadata {
            name: "degenerate".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::ImageFilter,
            description: "Rejects near-constant, all-black and non-finite images.".into(),
            help: "From the host's per-channel stats (R, G, B on 0..255): reject if the \
                   non-finite fraction > max-non-finite; if the mean of the channel means < \
                   min-mean (black); if every channel's std < min-std (near-constant). \
                   score = min(1, mean channel std / 64), 0 when non-finite."
                .into(),
            params: vec![
                params::number(
                    "min-std",
                    2.0,
                    "reject when every channel's std is below this (0..255)",
                ),
                params::number(
                    "min-mean",
                    4.0,
                    "reject when the mean brightness is below this (0..255)",
                ),
                params::number(
                    "max-non-finite",
                    0.0,
                    "reject when the fraction of non-finite pixels is above this (0..1)",
                ),
            ],
        }
    }
}

/// Thresholds of one check.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// Near-constant below this std in every channel.
    pub min_std: f32,
    /// Black below this mean brightness.
    pub min_mean: f32,
    /// Largest accepted non-finite fraction.
    pub max_non_finite: f32,
}

/// The verdict for an image with these stats (pure).
pub fn judge(
    stats: &[ChannelStats],
    non_finite: f32,
    t: Thresholds,
) -> Result<ImageVerdict, String> {
    if stats.is_empty() {
        return Err("host returned no channel statistics".into());
    }
    let n = stats.len() as f32;
    let mean_std = stats.iter().map(|s| s.std).sum::<f32>() / n;
    let max_std = stats.iter().map(|s| s.std).fold(0.0f32, f32::max);
    let brightness = stats.iter().map(|s| s.mean).sum::<f32>() / n;
    let score = (mean_std / FULL_SCORE_STD).clamp(0.0, 1.0);
    let verdict = |keep: bool, score: f32, reason: Option<String>| ImageVerdict {
        keep,
        score,
        reason,
    };
    Ok(
        if !non_finite.is_finite() || non_finite > t.max_non_finite {
            verdict(
                false,
                0.0,
                Some(format!(
                    "{:.2}% of pixels were non-finite before quantisation",
                    non_finite * 100.0
                )),
            )
        } else if brightness < t.min_mean {
            verdict(
                false,
                score,
                Some(format!(
                    "black image: mean brightness {brightness:.2} < min-mean {}",
                    t.min_mean
                )),
            )
        } else if max_std < t.min_std {
            verdict(
                false,
                score,
                Some(format!(
                    "near-constant image: channel std at most {max_std:.2} < min-std {}",
                    t.min_std
                )),
            )
        } else {
            verdict(true, score, None)
        },
    )
}

impl ImageFilter for Degenerate {
    fn check(img: &Image, _prompt: String, params: Params) -> Result<ImageVerdict, String> {
        let t = Thresholds {
            min_std: params.f32("min-std")?,
            min_mean: params.f32("min-mean")?,
            max_non_finite: params.f32("max-non-finite")?,
        };
        judge(&img.stats(), img.non_finite_fraction(), t)
    }
}

selma_plugin_sdk::export!(image_filter: Degenerate);

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        min_std: 2.0,
        min_mean: 4.0,
        max_non_finite: 0.0,
    };

    fn ch(mean: f32, std: f32) -> ChannelStats {
        ChannelStats {
            mean,
            std,
            min: 0,
            max: 255,
        }
    }

    #[test]
    fn natural_image_is_kept_with_its_score() {
        let v = judge(&[ch(120.0, 60.0), ch(110.0, 50.0), ch(90.0, 46.0)], 0.0, T).unwrap();
        assert!(v.keep);
        // mean std 52 / 64.
        assert!((v.score - 52.0 / 64.0).abs() < 1e-6);
        let v = judge(&[ch(120.0, 90.0); 3], 0.0, T).unwrap();
        assert_eq!(v.score, 1.0);
    }

    #[test]
    fn constant_black_and_non_finite_are_rejected() {
        let flat = judge(&[ch(200.0, 0.5), ch(10.0, 1.0), ch(30.0, 0.0)], 0.0, T).unwrap();
        assert!(!flat.keep && flat.reason.unwrap().contains("near-constant"));
        // One channel varying is enough not to be "constant".
        assert!(
            judge(&[ch(200.0, 0.5), ch(10.0, 8.0), ch(30.0, 0.0)], 0.0, T)
                .unwrap()
                .keep
        );
        let black = judge(&[ch(1.0, 3.0), ch(2.0, 3.0), ch(3.0, 3.0)], 0.0, T).unwrap();
        assert!(!black.keep && black.reason.unwrap().contains("black"));
        // All zeros is reported as black (the more specific reason), score 0.
        let zeros = judge(&[ch(0.0, 0.0); 3], 0.0, T).unwrap();
        assert!(!zeros.keep && zeros.score == 0.0 && zeros.reason.unwrap().contains("black"));
        let nan = judge(&[ch(120.0, 60.0); 3], 0.001, T).unwrap();
        assert!(!nan.keep && nan.score == 0.0 && nan.reason.unwrap().contains("0.10%"));
        assert!(!judge(&[ch(120.0, 60.0); 3], f32::NAN, T).unwrap().keep);
        assert!(judge(&[], 0.0, T).is_err());
    }
}
