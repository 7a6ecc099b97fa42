//! Text helpers for prompt plugins: rouge_score-compatible tokenisation and
//! ROUGE-L F1, word counts, numbered-list parsing and whitespace cleanup.

/// Tokenise like Google's `rouge_score` without stemming: lowercase, replace
/// every run of characters outside `[a-z0-9]` by a space, split, drop empties.
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for c in lower.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            tokens.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    tokens
}

/// Length of the longest common subsequence of two token sequences.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    if a.is_empty() || b.is_empty() {
        return 0;
    }
    // One row of the classic DP table, over the shorter sequence.
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut row = vec![0usize; short.len() + 1];
    for x in long {
        let mut diag = 0; // table[i-1][j-1]
        for (j, y) in short.iter().enumerate() {
            let up = row[j + 1]; // table[i-1][j]
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[short.len()]
}

/// ROUGE-L F-measure of two token sequences, computed exactly as
/// `rouge_score`'s `_score_lcs`: 0 if either is empty, else
/// `p = lcs / len(prediction)`, `r = lcs / len(target)`, `F = 2pr / (p + r)`
/// (0 when `p + r == 0`).
pub fn rouge_l_f1_tokens<T: PartialEq>(target: &[T], prediction: &[T]) -> f64 {
    if target.is_empty() || prediction.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(target, prediction) as f64;
    let precision = lcs / prediction.len() as f64;
    let recall = lcs / target.len() as f64;
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// ROUGE-L F1 of two texts, tokenised with [`tokenize`]
/// (= `RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure`).
pub fn rouge_l_f1(target: &str, prediction: &str) -> f64 {
    rouge_l_f1_tokens(&tokenize(target), &tokenize(prediction))
}

/// Number of whitespace-separated words.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Collapse every whitespace run to one space and trim both ends.
pub fn clean(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The items of a numbered list: every line that (after leading spaces)
/// starts with digits followed by `.` or `)` and then a space or the end of
/// the line; the item is the rest of the line, whitespace-collapsed. Other
/// lines and empty items are ignored.
pub fn parse_numbered_list(text: &str) -> Vec<String> {
    text.lines().filter_map(parse_numbered_line).collect()
}

fn parse_numbered_line(line: &str) -> Option<String> {
    let line = line.trim_start();
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let rest = &line[digits..];
    let rest = rest.strip_prefix('.').or_else(|| rest.strip_prefix(')'))?;
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    let item = clean(rest);
    (!item.is_empty()).then_some(item)
}

/// Format `items` as a numbered list, one `N. item` per line (1-based).
pub fn numbered_list<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{}. {}\n", i + 1, s.as_ref()))
        .collect()
}

/// `text` with its first character uppercased.
pub fn capitalize_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn tokenize_follows_rouge_score() {
        assert_eq!(
            tokenize("A red CAR, parked -- near 2 trees!"),
            ["a", "red", "car", "parked", "near", "2", "trees"]
        );
        // Apostrophes and hyphens split; non-ASCII letters are separators.
        assert_eq!(
            tokenize("don't self-driving café"),
            ["don", "t", "self", "driving", "caf"]
        );
        assert!(tokenize("  ,;!  ").is_empty());
        assert!(tokenize("").is_empty());
    }

    #[test]
    fn lcs_of_known_pairs() {
        let a = ["a", "b", "c", "b", "d", "a", "b"];
        let b = ["b", "d", "c", "a", "b", "a"];
        assert_eq!(lcs_len(&a, &b), 4); // CLRS: "b c b a"
        assert_eq!(lcs_len(&b, &a), 4);
        assert_eq!(lcs_len::<&str>(&[], &a), 0);
        assert_eq!(lcs_len(&["x"], &["y"]), 0);
    }

    #[test]
    fn rouge_l_hand_computed() {
        // 6 vs 6 tokens, LCS "the cat on the" = 4: p = r = 2/3, F = 2/3.
        assert!(close(
            rouge_l_f1("The cat sat on the mat", "the cat lay on the rug"),
            2.0 / 3.0
        ));
        // target 4 tokens, prediction 2, LCS 2: p = 1, r = 1/2, F = 2/3.
        assert!(close(rouge_l_f1("a b c d", "a c"), 2.0 / 3.0));
        // target 3, prediction 5, LCS 2 ("red ball"): p = 2/5, r = 2/3, F = 0.5.
        assert!(close(
            rouge_l_f1("red big ball", "a red small round ball"),
            0.5
        ));
        // Reversed order keeps one token: p = r = 1/5.
        assert!(close(
            rouge_l_f1("one two three four five", "five four three two one"),
            0.2
        ));
        // Case and punctuation do not matter.
        assert!(close(rouge_l_f1("Hello, World!", "hello world"), 1.0));
        assert_eq!(rouge_l_f1("", "anything"), 0.0);
        assert_eq!(rouge_l_f1("cat", "dog"), 0.0);
    }

    #[test]
    fn word_count_and_clean() {
        assert_eq!(word_count("  two  words "), 2);
        assert_eq!(word_count(""), 0);
        assert_eq!(clean("  a \n b\t c "), "a b c");
        assert_eq!(capitalize_first("élan vital"), "Élan vital");
        assert_eq!(capitalize_first(""), "");
    }

    #[test]
    fn parse_numbered_list_keeps_only_numbered_items() {
        let reply = "Here are some prompts:\n1. A cat on a mat.\n  2) Two dogs   running\n\
                     3.\n10. A tall tree\nnot numbered\n4.5 apples\n5.No space\n - 6. bullet";
        assert_eq!(
            parse_numbered_list(reply),
            ["A cat on a mat.", "Two dogs running", "A tall tree"]
        );
        assert!(parse_numbered_list("").is_empty());
    }

    #[test]
    fn numbered_list_round_trips() {
        let items = ["first prompt", "second one", "third"];
        assert_eq!(
            numbered_list(&items),
            "1. first prompt\n2. second one\n3. third\n"
        );
        assert_eq!(parse_numbered_list(&numbered_list(&items)), items);
    }

    #[test]
    fn rouge_l_matches_the_rouge_score_package_bit_for_bit() {
        // Expected values printed by Python rouge_score 0.1.2:
        // RougeScorer(["rougeL"], use_stemmer=False).score(target, prediction)["rougeL"].fmeasure
        let cases: [(&str, &str, f64); 8] = [
            (
                "A man in a yellow raincoat walks a small brown dog along a wet city street.",
                "A man walking a dog on a busy street, with a small dog nearby.",
                0.39999999999999997,
            ),
            (
                "Three green apples lined up on a wooden cutting board.",
                "Three red apples lined up on a wooden table.",
                0.7368421052631577,
            ),
            (
                "portrait of an elderly fisherman, oil painting, 8k, highly detailed",
                "Portrait of an old sailor with a white beard, oil painting, 85mm lens, 8K",
                0.5,
            ),
            (
                "Café au lait — naïve façade; déjà-vu!",
                "cafe au lait naive facade deja vu",
                0.3529411764705882,
            ),
            (
                "The year 2024: 3D-render of R2-D2",
                "a 3d render of r2 d2 in 2024",
                0.625,
            ),
            (
                "don't stop-believing",
                "dont stop believing",
                0.5714285714285715,
            ),
            ("a b c d f", "a b c d e", 0.8000000000000002),
            ("...", "a", 0.0),
        ];
        for (target, prediction, want) in cases {
            assert_eq!(
                rouge_l_f1(target, prediction),
                want,
                "{target:?} vs {prediction:?}"
            );
        }
    }
}
