//! When a cache re-rotates its keys under a length-dependent scheme.

use crate::Scaling;

/// When a cache recomputes the frequencies of a length-dependent scheme, and so
/// re-rotates its cached keys (see the [module docs](super)).
///
/// With `n` the cache length after an append and `L0` the scheme's
/// `original_max_position_embeddings`, the frequencies in force are
/// `config.frequencies_for_len(L)` with `L = self.frequency_len(scaling, n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefreshPolicy {
    /// `L = n`: the frequencies for the current length at every append, transformers'
    /// semantics for the sequence being attended. Dynamic NTK re-rotates at every
    /// append past `L0`.
    #[default]
    EveryChange,
    /// `L = n` while `n <= L0`, else `L = n.next_power_of_two()`: at most
    /// `1 + ceil(log2(n / L0))` re-rotations over a whole generation.
    PowerOfTwo,
}

impl RefreshPolicy {
    /// The sequence length whose frequencies are in force once the cache holds `len`
    /// tokens (see the type docs). Schemes that ignore the length ignore this too.
    ///
    /// ```
    /// use ropex::{Scaling, attention::decode::RefreshPolicy};
    /// let dynamic = Scaling::dynamic(2.0, 100);
    /// assert_eq!(RefreshPolicy::EveryChange.frequency_len(&dynamic, 130), 130);
    /// assert_eq!(RefreshPolicy::PowerOfTwo.frequency_len(&dynamic, 90), 90);
    /// assert_eq!(RefreshPolicy::PowerOfTwo.frequency_len(&dynamic, 130), 256);
    /// ```
    pub fn frequency_len(self, scaling: &Scaling, len: usize) -> usize {
        match self {
            RefreshPolicy::EveryChange => len,
            RefreshPolicy::PowerOfTwo => match scaling.length_threshold() {
                Some(l0) if len > l0 => len.checked_next_power_of_two().unwrap_or(len),
                _ => len,
            },
        }
    }
}
