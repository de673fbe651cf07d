//! Su's evaluation protocol: at every context length the same final bytes are scored
//! (the last `train_len` bytes of each window), over fixed window end points shared by
//! every length and scheme, so that the columns of a table differ only in how much
//! context precedes the scored bytes.

use crate::error::{ModelError, Result};

/// Window end offsets (exclusive), evenly spaced over a text of `n_bytes`, shared by every
/// length: the window of length `L` ending at `e` is `text[e - L .. e]`, its targets
/// `text[e - L + 1 ..= e]`. The same formula as `tools/train_tiny_lm.py`'s
/// `eval_endpoints`, so the two agree for the same count and longest length.
///
/// ```
/// let ends = ropex_lm::protocol::endpoints(1000, 256, 4)?;
/// assert_eq!(ends, [256, 503, 751, 999]);
/// # Ok::<(), ropex_lm::ModelError>(())
/// ```
pub fn endpoints(n_bytes: usize, max_len: usize, windows: usize) -> Result<Vec<usize>> {
    if n_bytes < max_len.saturating_add(1) {
        return Err(ModelError::Input(format!(
            "the text has {n_bytes} bytes, shorter than one window: the longest context \
             ({max_len} bytes) needs at least {} bytes",
            max_len.saturating_add(1)
        )));
    }
    let (lo, hi) = (max_len, n_bytes - 1);
    Ok((0..windows)
        .map(|n| lo + n * (hi - lo) / windows.saturating_sub(1).max(1))
        .collect())
}

/// The window of context length `len` ending at `end` (exclusive) under Su's protocol,
/// scoring its final `scored` tokens: the model reads `input`, and the NLL of
/// `targets` (the next token after each input position) is taken from row `from` on,
/// i.e. of the tokens `end - scored + 1 ..= end`, the same for every `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Token indices read by the model: `end - len .. end`.
    pub input: std::ops::Range<usize>,
    /// Token indices predicted after each input position: `end - len + 1 .. end + 1`.
    pub targets: std::ops::Range<usize>,
    /// The first scored row of the window: `len - scored`.
    pub from: usize,
}

impl Window {
    /// The window of `len` tokens ending at `end`, scoring its last `scored` tokens;
    /// errors when `len > end`, `scored` is 0 or more than `len`.
    ///
    /// ```
    /// let w = ropex_lm::protocol::Window::new(16384, 8192, 512)?;
    /// assert_eq!((w.input, w.targets, w.from), (8192..16384, 8193..16385, 7680));
    /// # Ok::<(), ropex_lm::ModelError>(())
    /// ```
    pub fn new(end: usize, len: usize, scored: usize) -> Result<Window> {
        if len > end || scored == 0 || scored > len {
            return Err(ModelError::Input(format!(
                "a window of {len} tokens ending at {end} scoring {scored}: need \
                 1 <= scored <= len <= end"
            )));
        }
        Ok(Window {
            input: end - len..end,
            targets: end - len + 1..end + 1,
            from: len - scored,
        })
    }

    /// The token indices whose NLL is scored: `targets` from row `from` on.
    pub fn scored(&self) -> std::ops::Range<usize> {
        self.targets.start + self.from..self.targets.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every context length scores the same final tokens of the window; the windows of
    /// `endpoints` fit the text for the longest length; bad windows are errors.
    #[test]
    fn windows_score_the_same_tokens_at_every_length() {
        let ends = endpoints(300_000, 32_768, 3).unwrap();
        assert_eq!(ends, [32_768, 32_768 + (299_999 - 32_768) / 2, 299_999]);
        for &end in &ends {
            let mut scored = None;
            for len in [2048, 4096, 8192, 16_384, 32_768] {
                let w = Window::new(end, len, 512).unwrap();
                assert_eq!(w.input.len(), len);
                assert_eq!(w.targets.len(), len);
                assert_eq!(w.targets.end, end + 1);
                assert!(w.targets.end <= 300_000, "targets inside the text");
                assert_eq!(w.scored().len(), 512);
                assert_eq!(*scored.get_or_insert(w.scored()), w.scored());
            }
        }
        assert!(Window::new(100, 101, 10).is_err());
        assert!(Window::new(100, 50, 0).is_err());
        assert!(Window::new(100, 50, 51).is_err());
        assert!(endpoints(32_768, 32_768, 1).is_err());
    }
}
