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
