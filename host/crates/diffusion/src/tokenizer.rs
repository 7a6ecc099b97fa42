//! CLIP's byte-level BPE tokenizer, written here (no `tokenizers` crate):
//! loads `tokenizer.json` (HF tokenizers: `model.vocab` + `model.merges`) or
//! `vocab.json` + `merges.txt`, reads bos/eos/pad and the maximum length from
//! `tokenizer_config.json` / `special_tokens_map.json` (pad falls back to
//! eos), and encodes as CLIP does: whitespace collapsed and lowercased, split
//! by CLIP's pre-tokenisation pattern, bytes mapped to printable characters,
//! BPE with `</w>` marking the end of a word, then bos + tokens + eos,
//! truncated and padded to 77. (Not done: ftfy's mojibake repair, HTML
//! unescaping and NFC normalisation, which change only unusual input.)

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// End-of-word suffix of CLIP's BPE.
const EOW: &str = "</w>";
const BOS_DEFAULT: &str = "<|startoftext|>";
const EOS_DEFAULT: &str = "<|endoftext|>";

/// CLIP BPE tokenizer.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    ranks: HashMap<(String, String), u32>,
    byte_enc: [char; 256],
    byte_dec: HashMap<char, u8>,
    /// Special tokens matched whole in the text (bos, eos and added tokens).
    specials: Vec<(String, u32)>,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: Option<u32>,
    max_len: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2/CLIP's reversible byte -> printable character map.
fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(c).expect("valid code point");
    }
    out
}

/// The text of a token entry in tokenizer_config.json / special_tokens_map.json:
/// either a string or an AddedToken object with `content`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))
}

/// Special-token settings read from a tokenizer folder.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// Beginning-of-text token text.
    pub bos: Option<String>,
    /// End-of-text token text.
    pub eos: Option<String>,
    /// Padding token text.
    pub pad: Option<String>,
    /// Unknown token text.
    pub unk: Option<String>,
    /// `model_max_length`.
    pub max_len: Option<usize>,
}

impl SpecialTokens {
    /// Reads `tokenizer_config.json` then `special_tokens_map.json` (the
    /// latter fills what the former lacks); absent files are fine.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut st = SpecialTokens::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if !p.is_file() {
                continue;
            }
            let v = read_json(&p)?;
            let get = |k: &str| v.get(k).and_then(token_text);
            st.bos = st.bos.or_else(|| get("bos_token"));
            st.eos = st.eos.or_else(|| get("eos_token"));
            st.pad = st.pad.or_else(|| get("pad_token"));
            st.unk = st.unk.or_else(|| get("unk_token"));
            if st.max_len.is_none() {
                st.max_len = v
                    .get("model_max_length")
                    .and_then(|m| m.as_f64())
                    .filter(|m| *m >= 2.0 && *m <= 100_000.0)
                    .map(|m| m as usize);
            }
        }
        Ok(st)
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json`, or `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let special = SpecialTokens::from_dir(dir)?;
        let tj = dir.join("tokenizer.json");
        if tj.is_file() {
            let v = read_json(&tj)?;
            return Self::from_tokenizer_json(&v, special)
                .with_context(|| format!("loading tokenizer {}", tj.display()));
        }
        let (vp, mp) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vp.is_file() && mp.is_file() {
            let vocab = read_json(&vp)?;
            let merges = std::fs::read_to_string(&mp)
                .with_context(|| format!("reading {}", mp.display()))?;
            return Self::from_vocab_merges(&vocab, &merges, special)
                .with_context(|| format!("loading tokenizer {}", dir.display()));
        }
        bail!(
            "tokenizer folder {} has neither tokenizer.json nor vocab.json + merges.txt",
            dir.display()
        )
    }

    /// Builds from an HF `tokenizer.json` value.
    pub fn from_tokenizer_json(v: &Value, mut special: SpecialTokens) -> Result<Self> {
        let model = v.get("model").context("tokenizer.json has no \"model\"")?;
        if let Some(t) = model.get("type").and_then(|t| t.as_str()) {
            if t != "BPE" {
                bail!("tokenizer.json model type is {t:?}, expected \"BPE\"");
            }
        }
        let mut vocab = parse_vocab(
            model
                .get("vocab")
                .context("tokenizer.json has no model.vocab")?,
        )?;
        let merges_v = model
            .get("merges")
            .and_then(|m| m.as_array())
            .context("tokenizer.json has no model.merges list")?;
        let mut merges = Vec::with_capacity(merges_v.len());
        for (i, m) in merges_v.iter().enumerate() {
            let pair = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            };
            merges.push(pair.with_context(|| format!("model.merges[{i}] is not a pair: {m}"))?);
        }
        if let Some(added) = v.get("added_tokens").and_then(|a| a.as_array()) {
            for t in added {
                if let (Some(id), Some(c)) = (
                    t.get("id").and_then(|i| i.as_u64()),
                    t.get("content").and_then(|c| c.as_str()),
                ) {
                    vocab.entry(c.to_string()).or_insert(id as u32);
                }
            }
        }
        if special.unk.is_none() {
            special.unk = model.get("unk_token").and_then(token_text);
        }
        if special.pad.is_none() {
            special.pad = v
                .get("padding")
                .and_then(|p| p.get("pad_token"))
                .and_then(token_text);
        }
        if special.max_len.is_none() {
            special.max_len = v
                .get("truncation")
                .and_then(|t| t.get("max_length"))
                .and_then(|m| m.as_u64())
                .map(|m| m as usize);
        }
        Self::new(vocab, merges, special)
    }

    /// Builds from a `vocab.json` value and `merges.txt` text (a leading
    /// `#version` line is skipped).
    pub fn from_vocab_merges(
        vocab: &Value,
        merges_txt: &str,
        special: SpecialTokens,
    ) -> Result<Self> {
        let vocab = parse_vocab(vocab)?;
        let mut merges = vec![];
        for (i, line) in merges_txt.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').with_context(|| {
                format!("merges.txt line {}: expected two symbols: {line:?}", i + 1)
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        Self::new(vocab, merges, special)
    }

    /// Builds from a vocabulary, ranked merges and special-token settings.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        special: SpecialTokens,
    ) -> Result<Self> {
        let id_of = |what: &str, text: &str| -> Result<u32> {
            vocab
                .get(text)
                .copied()
                .with_context(|| format!("the {what} token {text:?} is not in the vocabulary"))
        };
        let bos_text = special.bos.clone().unwrap_or_else(|| BOS_DEFAULT.into());
        let eos_text = special.eos.clone().unwrap_or_else(|| EOS_DEFAULT.into());
        let bos = id_of("bos", &bos_text)?;
        let eos = id_of("eos", &eos_text)?;
        let pad = match &special.pad {
            Some(p) => id_of("pad", p)?,
            None => eos,
        };
        let unk = match &special.unk {
            Some(u) => Some(id_of("unk", u)?),
            None => None,
        };
        let max_len = special.max_len.unwrap_or(77);
        if max_len < 2 {
            bail!("model_max_length {max_len} leaves no room for bos and eos");
        }
        // A merge whose result is not in the vocabulary can only produce
        // unknown pieces; CLIP's merges.txt may list more merges than its
        // vocabulary covers (openai's tokenizer uses only the first 48894),
        // so such merges are dropped, keeping the order of the rest.
        let ranks = merges
            .into_iter()
            .filter(|(a, b)| vocab.contains_key(&format!("{a}{b}")))
            .enumerate()
            .map(|(i, p)| (p, i as u32))
            .collect();
        let decoder = vocab.iter().map(|(k, v)| (*v, k.clone())).collect();
        let byte_enc = bytes_to_unicode();
        let byte_dec = byte_enc
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let mut specials: Vec<(String, u32)> = vec![(bos_text, bos), (eos_text, eos)];
        for s in [BOS_DEFAULT, EOS_DEFAULT] {
            if let Some(id) = vocab.get(s) {
                if !specials.iter().any(|(t, _)| t == s) {
                    specials.push((s.to_string(), *id));
                }
            }
        }
        Ok(Self {
            vocab,
            decoder,
            ranks,
            byte_enc,
            byte_dec,
            specials,
            bos,
            eos,
            pad,
            unk,
            max_len,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Id of the beginning-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    /// Id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    /// Id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    /// Sequence length of `encode_padded` (77 for Stable Diffusion).
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Number of vocabulary entries.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    /// Id of a vocabulary entry, if present.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// CLIP's text cleanup: whitespace runs collapsed to one space, trimmed, lowercased.
    pub fn clean(text: &str) -> String {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    }

    /// Splits cleaned text like CLIP's pattern
    /// `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
    /// (special tokens first, then the alternatives in order, leftmost-first).
    pub fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut out = vec![];
        let mut i = 0;
        let bytes_len = text.len();
        'outer: while i < bytes_len {
            let rest = &text[i..];
            let c = rest.chars().next().unwrap();
            if c.is_whitespace() {
                i += c.len_utf8();
                continue;
            }
            for (s, _) in &self.specials {
                if rest.starts_with(s.as_str()) {
                    out.push(&rest[..s.len()]);
                    i += s.len();
                    continue 'outer;
                }
            }
            if c == '\'' {
                for suf in ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"] {
                    if rest.starts_with(suf) {
                        out.push(&rest[..suf.len()]);
                        i += suf.len();
                        continue 'outer;
                    }
                }
            }
            let len = if c.is_alphabetic() {
                rest.char_indices()
                    .find(|(_, ch)| !ch.is_alphabetic())
                    .map_or(rest.len(), |(j, _)| j)
            } else if c.is_numeric() {
                c.len_utf8()
            } else {
                rest.char_indices()
                    .find(|(_, ch)| ch.is_whitespace() || ch.is_alphabetic() || ch.is_numeric())
                    .map_or(rest.len(), |(j, _)| j)
            };
            out.push(&rest[..len]);
            i += len;
        }
        out
    }

    /// BPE of one pre-token (already byte-encoded) -> vocabulary pieces.
    fn bpe(&self, token: &str) -> Vec<String> {
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str(EOW);
        }
        while word.len() > 1 {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..word.len() - 1 {
                if let Some(&r) = self.ranks.get(&(word[i].clone(), word[i + 1].clone())) {
                    if best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, bi)) = best else { break };
            let (a, b) = (word[bi].clone(), word[bi + 1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }

    /// Token ids of `text` without bos/eos, padding or truncation.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let cleaned = Self::clean(text);
        let mut ids = vec![];
        for piece in self.pre_tokenize(&cleaned) {
            if let Some((_, id)) = self.specials.iter().find(|(s, _)| s == piece) {
                ids.push(*id);
                continue;
            }
            if let Some(cached) = self.cache.lock().unwrap().get(piece) {
                ids.extend_from_slice(cached);
                continue;
            }
            let encoded: String = piece.bytes().map(|b| self.byte_enc[b as usize]).collect();
            let mut piece_ids = vec![];
            for sub in self.bpe(&encoded) {
                match self.vocab.get(&sub).copied().or(self.unk) {
                    Some(id) => piece_ids.push(id),
                    None => bail!(
                        "BPE piece {sub:?} of {piece:?} is not in the vocabulary and the tokenizer has no unk token"
                    ),
                }
            }
            let mut cache = self.cache.lock().unwrap();
            if cache.len() < 50_000 {
                cache.insert(piece.to_string(), piece_ids.clone());
            }
            ids.extend(piece_ids);
        }
        Ok(ids)
    }

    /// `[bos] + tokens + [eos]`, tokens truncated so the total is at most
    /// `max_len`, then padded with the pad id to exactly `max_len`.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut toks = self.encode(text)?;
        toks.truncate(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend(toks);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// Number of prompt tokens beyond what fits (0 when nothing is truncated).
    pub fn truncated_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text)?.len().saturating_sub(self.max_len - 2))
    }

    /// Text of ids (specials kept, `</w>` turned into spaces).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::new();
        for id in ids {
            if let Some(t) = self.decoder.get(id) {
                s.push_str(t);
            }
        }
        let bytes: Vec<u8> = s
            .replace(EOW, " ")
            .chars()
            .flat_map(|c| match self.byte_dec.get(&c) {
                Some(b) if c != ' ' => vec![*b],
                _ => c.to_string().into_bytes(),
            })
            .collect();
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }
}

fn parse_vocab(v: &Value) -> Result<HashMap<String, u32>> {
    let obj = v
        .as_object()
        .context("vocabulary is not a JSON object of token -> id")?;
    let mut out = HashMap::with_capacity(obj.len());
    for (k, id) in obj {
        let id = id
            .as_u64()
            .with_context(|| format!("vocabulary entry {k:?} has a non-integer id"))?;
        out.insert(k.clone(), id as u32);
    }
    Ok(out)
}
