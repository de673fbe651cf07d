//! [`GgufTokenizer`]: the byte-level BPE tokenizer stored in a GGUF file, built with the
//! `tokenizers` crate from the file's own `tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges` (no tokenizer.json, no network).
//!
//! Pre-tokenization is `Sequence[Digits(individual_digits), ByteLevel(no prefix space,
//! GPT-2 regex)]`: SmolLM2's files say `tokenizer.ggml.pre = "smollm"`, which llama.cpp
//! reads as "split every digit, then GPT-2's byte-level split". Without the digit split
//! (what a plain GPT-2 conversion does) about one token in 120 of English prose differs
//! from the model's training tokenization. Tokens of type 3 (control, e.g.
//! `<|im_start|>`) are special tokens, matched whole in the input. Decoding is the
//! byte-level decoder.

use ropex::gguf::Gguf;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::error::{LlamaError, Result};

/// The GGUF token type of control tokens (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;

/// A GGUF file's byte-level BPE tokenizer.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> LlamaError {
    LlamaError::Tokenizer(e.to_string())
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF header. The file must say
    /// `tokenizer.ggml.model = "gpt2"` (byte-level BPE) and a `pre` of `smollm`,
    /// `gpt2` or nothing (`gpt2` has no digit split).
    pub fn from_gguf(g: &Gguf) -> Result<GgufTokenizer> {
        let string = |key: &str| g.get(key).and_then(|v| v.as_str());
        let model = string("tokenizer.ggml.model");
        if model != Some("gpt2") {
            return Err(LlamaError::Unsupported {
                what: format!("tokenizer.ggml.model = {model:?}"),
                allowed: "\"gpt2\" (byte-level BPE)",
            });
        }
        let split_digits = match string("tokenizer.ggml.pre") {
            Some("smollm") => true,
            Some("gpt2") | None => false,
            Some(other) => {
                return Err(LlamaError::Unsupported {
                    what: format!("tokenizer.ggml.pre = \"{other}\""),
                    allowed: "\"smollm\" or \"gpt2\"",
                });
            }
        };
        let strings = |key: &str| -> Result<&[String]> {
            g.get(key)
                .and_then(|v| v.as_array())
                .and_then(|a| a.as_strings())
                .ok_or_else(|| LlamaError::MissingKey {
                    key: key.into(),
                    expected: "an array of strings",
                })
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(LlamaError::Tokenizer(format!(
                "{} token strings but only {} distinct",
                tokens.len(),
                vocab.len()
            )));
        }
        let merges: Merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| LlamaError::Tokenizer(format!("merge '{m}' has no space")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        if split_digits {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(byte_level));
        if let Some(types) = g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            let special: Vec<AddedToken> = (0..types.len())
                .filter(|&i| types.get(i).and_then(|v| v.as_i64()) == Some(CONTROL))
                .filter_map(|i| tokens.get(i))
                .map(|t| AddedToken::from(t.clone(), true))
                .collect();
            inner.add_special_tokens(&special);
        }
        Ok(GgufTokenizer { inner })
    }

    /// Token ids of `text` (no BOS or other added tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The id of a token string, e.g. `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
