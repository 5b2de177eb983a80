//! Text <-> token ids, with the files OPT checkpoints ship.
//!
//! A checkpoint directory may hold `tokenizer.json` (the `tokenizers` library's own format) or the
//! GPT-2 style pair `vocab.json` + `merges.txt` that Meta's OPT uploads carry. Like transformers'
//! OPT tokenizer, encoding puts the BOS token (`</s>`, id 2) first.

use crate::error::{ExecError, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens of the OPT vocabulary; registered so that decoding can skip them.
const OPT_SPECIAL_TOKENS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];

/// A loaded tokenizer and the BOS id it prepends.
pub struct TextTokenizer {
    inner: Tokenizer,
    bos_token_id: u32,
    /// The file(s) it was read from, for messages.
    pub source: PathBuf,
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory, if it has one: `tokenizer.json` first, then
    /// `vocab.json` + `merges.txt`. Returns `Ok(None)` when neither is present.
    pub fn from_dir(dir: &Path, bos_token_id: u32) -> Result<Option<TextTokenizer>> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let inner = if json.is_file() {
            let t = Tokenizer::from_file(&json).map_err(|e| ExecError::Tokenizer {
                path: json.clone(),
                message: e.to_string(),
            })?;
            (t, json)
        } else if vocab.is_file() && merges.is_file() {
            let bad = |e: tokenizers::Error| ExecError::Tokenizer {
                path: vocab.clone(),
                message: e.to_string(),
            };
            let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?)
                .build()
                .map_err(bad)?;
            let mut t = Tokenizer::new(bpe);
            // GPT-2 byte-level BPE, as OPT's GPT2Tokenizer (no prefix space).
            t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            t.with_decoder(Some(ByteLevel::new(false, true, true)));
            let specials: Vec<AddedToken> = OPT_SPECIAL_TOKENS
                .iter()
                .filter(|s| t.token_to_id(s).is_some())
                .map(|s| AddedToken::from(*s, true))
                .collect();
            t.add_special_tokens(&specials);
            (t, vocab.clone())
        } else {
            return Ok(None);
        };
        Ok(Some(TextTokenizer {
            inner: inner.0,
            bos_token_id,
            source: inner.1,
        }))
    }

    /// Token ids of `text`, BOS first.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ExecError::Tokenize(format!("cannot encode {text:?}: {e}")))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if enc.get_ids().first() != Some(&self.bos_token_id) {
            ids.push(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ExecError::Tokenize(format!("cannot decode {ids:?}: {e}")))
    }
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| ExecError::Tokenizer {
            path: p.to_path_buf(),
            message: "path is not valid UTF-8".into(),
        })
}
