//! Passkey retrieval: the prompt of the Landmark-attention paper (Mohtashami & Jaggi,
//! 2023), reused by YaRN and llama.cpp's `passkey` example. A task sentence, filler
//! sentences repeated, the needle "The pass key is N. Remember it. N is the pass key."
//! at a depth (fraction of the fillers before it), more filler, then the question
//! "What is the pass key? The pass key is"; the model's greedy continuation is parsed for
//! the first number ([`parse_answer`]).

use crate::error::{ModelError, Result};

/// The task sentence that opens the prompt.
pub const TASK: &str = "There is an important info hidden inside a lot of irrelevant text. \
                        Find it and memorize them. I will quiz you about the important \
                        information there.";

/// One filler unit, repeated.
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// The question that ends the prompt.
pub const QUESTION: &str = "What is the pass key? The pass key is";

/// The needle sentence for `key`.
pub fn needle(key: u64) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key.")
}

/// A passkey prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt text.
    pub text: String,
    /// The key hidden in it.
    pub key: u64,
    /// Filler units before the needle.
    pub before: usize,
    /// Filler units after the needle.
    pub after: usize,
}

/// The prompt with `fillers` filler units, `round(depth * fillers)` of them before the
/// needle (`depth` in `0..=1`), pieces joined by single spaces.
pub fn prompt(fillers: usize, depth: f64, key: u64) -> Result<Prompt> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(ModelError::Input(format!(
            "passkey depth {depth} must be in 0..=1 (the fraction of filler before the key)"
        )));
    }
    let before = ((depth * fillers as f64).round() as usize).min(fillers);
    let after = fillers - before;
    let mut parts = vec![TASK.to_string()];
    parts.extend(std::iter::repeat_n(FILLER.to_string(), before));
    parts.push(needle(key));
    parts.extend(std::iter::repeat_n(FILLER.to_string(), after));
    parts.push(QUESTION.into());
    Ok(Prompt {
        text: parts.join(" "),
        key,
        before,
        after,
    })
}

/// The longest prompt ([`prompt`]) of at most `max_tokens` tokens as counted by `count`
/// (the model's tokenizer): the filler count is estimated from two probes, then
/// adjusted by one unit at a time. Errors when even no filler exceeds `max_tokens`.
pub fn fit(
    max_tokens: usize,
    depth: f64,
    key: u64,
    count: impl Fn(&str) -> Result<usize>,
) -> Result<(Prompt, usize)> {
    let n0 = count(&prompt(0, depth, key)?.text)?;
    if n0 > max_tokens {
        return Err(ModelError::Input(format!(
            "a passkey prompt without filler has {n0} tokens, more than {max_tokens}"
        )));
    }
    let per = count(&prompt(16, depth, key)?.text)?
        .saturating_sub(n0)
        .max(16) as f64
        / 16.0;
    let mut n = ((max_tokens - n0) as f64 / per) as usize;
    let mut p = prompt(n, depth, key)?;
    let mut len = count(&p.text)?;
    while len > max_tokens && n > 0 {
        n -= 1;
        p = prompt(n, depth, key)?;
        len = count(&p.text)?;
    }
    loop {
        let next = prompt(n + 1, depth, key)?;
        let next_len = count(&next.text)?;
        if next_len > max_tokens {
            return Ok((p, len));
        }
        (n, p, len) = (n + 1, next, next_len);
    }
}

/// The first number in a model's continuation (its first run of ASCII digits), if it
/// starts within the first non-space word: " 68213. Remember" gives 68213, " is 5"
/// gives `None`.
pub fn parse_answer(text: &str) -> Option<u64> {
    let t = text.trim_start();
    let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `n` deterministic five-digit keys (10000..=99999) from `seed` (SplitMix64), so a run
/// is reproducible.
pub fn keys(n: usize, seed: u64) -> Vec<u64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            10_000 + (z ^ (z >> 31)) % 90_000
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prompt is task, fillers, needle, fillers, question in that order, with the
    /// needle after `round(depth * n)` fillers.
    #[test]
    fn prompt_places_the_needle_at_its_depth() {
        let p = prompt(10, 0.25, 4242).unwrap();
        assert_eq!((p.before, p.after, p.key), (3, 7, 4242));
        let needle_at = p
            .text
            .find("The pass key is 4242. Remember it. 4242 is")
            .unwrap();
        assert_eq!(p.text[..needle_at].matches(FILLER).count(), 3);
        assert_eq!(p.text[needle_at..].matches(FILLER).count(), 7);
        assert!(p.text.starts_with(TASK));
        assert!(p.text.ends_with(
            " yellow. Here we go. There and back again. What is the pass key? The pass key is"
        ));
        assert_eq!(prompt(4, 1.0, 1).unwrap().after, 0);
        assert!(prompt(4, 1.5, 1).is_err());
    }

    /// With a word count as the tokenizer, `fit` returns the longest prompt within the
    /// budget: one more filler unit would exceed it.
    #[test]
    fn fit_is_the_longest_prompt_within_budget() {
        let words = |s: &str| Ok(s.split_whitespace().count());
        for budget in [60, 500, 4096] {
            let (p, n) = fit(budget, 0.5, 12345, words).unwrap();
            assert_eq!(n, words(&p.text).unwrap());
            assert!(n <= budget);
            let more = prompt(p.before + p.after + 1, 0.5, 12345).unwrap();
            assert!(words(&more.text).unwrap() > budget, "budget {budget}");
        }
        assert!(fit(10, 0.5, 1, words).is_err());
    }

    /// Answers are the leading number; anything else is no answer.
    #[test]
    fn answers_parse_the_leading_number() {
        assert_eq!(parse_answer(" 68213. Remember it."), Some(68213));
        assert_eq!(parse_answer("68213"), Some(68213));
        assert_eq!(parse_answer("\n 7"), Some(7));
        assert_eq!(parse_answer(" is 5"), None);
        assert_eq!(parse_answer(""), None);
        let k = keys(50, 7);
        assert!(k.iter().all(|&k| (10_000..100_000).contains(&k)));
        assert_eq!(k, keys(50, 7));
        assert_ne!(k, keys(50, 8));
    }
}
