//! The `rouge-l` prompt filter: the Self-Instruct diversity filter. A
//! candidate is rejected when its ROUGE-L F1 (rouge_score tokenisation, no
//! stemming) against any pooled prompt, or any candidate kept earlier in the
//! same call, is above the threshold.

use selma_plugin_sdk::text::{rouge_l_f1_tokens, tokenize};
use selma_plugin_sdk::{
    keep, params, reject, Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict,
};

struct RougeL;

impl Plugin for RougeL {
    fn metadata() -> Metadata {
        Metadata {
            name: "rouge-l".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::PromptFilter,
            description:
                "Rejects candidates whose ROUGE-L F1 against any pooled prompt exceeds a threshold."
                    .into(),
            help: "tokens: lowercase, split on [^a-z0-9]+ (rouge_score, no stemming). \
                   F1 = 2PR/(P+R) with P = LCS/len(candidate), R = LCS/len(pooled). \
                   Reject if max F1 over the pool and the candidates kept earlier in the call \
                   is > threshold (SELMA's code: 0.8; Self-Instruct: 0.7)."
                .into(),
            params: vec![params::number(
                "threshold",
                0.8,
                "reject when ROUGE-L F1 to a pooled prompt is above this (0..1)",
            )],
        }
    }
}

/// The verdicts for `candidates` against `pool` (pure; see the crate docs).
pub fn judge(candidates: &[String], pool: &[String], threshold: f64) -> Vec<Verdict> {
    let mut kept: Vec<(Vec<String>, &str)> =
        pool.iter().map(|p| (tokenize(p), p.as_str())).collect();
    let mut out = Vec::with_capacity(candidates.len());
    for cand in candidates {
        let tokens = tokenize(cand);
        let mut worst: Option<(f64, &str)> = None;
        for (pooled, text) in &kept {
            let f = rouge_l_f1_tokens(pooled, &tokens);
            if f > threshold && worst.is_none_or(|(w, _)| f > w) {
                worst = Some((f, text));
            }
        }
        match worst {
            Some((f, text)) => out.push(reject(format!(
                "ROUGE-L F1 {f:.3} > {threshold} against \"{text}\""
            ))),
            None => {
                out.push(keep());
                kept.push((tokens, cand.as_str()));
            }
        }
    }
    out
}

impl PromptFilter for RougeL {
    fn filter(
        candidates: Vec<String>,
        pool: Vec<String>,
        params: Params,
    ) -> Result<Vec<Verdict>, String> {
        let threshold = params.f64("threshold")?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(format!(
                "parameter \"threshold\": {threshold} is outside 0..1"
            ));
        }
        Ok(judge(&candidates, &pool, threshold))
    }
}

selma_plugin_sdk::export!(prompt_filter: RougeL);

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn rejects_near_duplicates_of_pool_and_of_earlier_kept_candidates() {
        let pool = s(&["a red car parked on a quiet street"]);
        let cands = s(&[
            // 8 tokens vs 8, LCS 7 -> F1 7/8 = 0.875 > 0.8: rejected.
            "a blue car parked on a quiet street",
            // Unrelated: kept.
            "three cats sleeping on a sofa",
            // vs the kept "three cats sleeping on a sofa": LCS 5 of 6 / 6 -> 0.833: rejected.
            "three dogs sleeping on a sofa",
            // LCS with the pool "a car on a street" = 5 of 9 and 8 tokens:
            // P = 5/9, R = 5/8 -> F1 = 10/17 = 0.588: kept.
            "a small car waits on a busy street today",
        ]);
        let v = judge(&cands, &pool, 0.8);
        assert_eq!(
            v.iter().map(|v| v.keep).collect::<Vec<_>>(),
            [false, true, false, true]
        );
        assert!(v[0].reason.as_ref().unwrap().contains("0.875"));
        assert!(v[2]
            .reason
            .as_ref()
            .unwrap()
            .contains("three cats sleeping"));
        // A stricter threshold also rejects the last one (0.588 > 0.5).
        assert!(!judge(&cands, &pool, 0.5)[3].keep);
        assert!(judge(&cands, &pool, 0.6)[3].keep);
    }

    #[test]
    fn threshold_comparison_is_strict_in_rouge_score_arithmetic() {
        // P = 1, R = 2/3: F1 evaluates to exactly 0.8 in f64 (as in Python): kept.
        assert!(judge(&s(&["a b"]), &s(&["a x b"]), 0.8)[0].keep);
        // P = R = 4/5: 2PR/(P+R) evaluates to 0.8000000000000002 (Python
        // rouge_score gives the same): rejected, as the reference would.
        assert!(!judge(&s(&["a b c d f"]), &s(&["a b c d e"]), 0.8)[0].keep);
    }
}
