//! Attention masks that combine with any position map: a sliding window (Mistral,
//! Gemma 2/3 local layers, gpt-oss: key `j` visible from query `i` iff `|i - j| < window`,
//! i.e. `i - j < window` under causal attention) and chunked attention (Llama 4 local
//! layers: visible iff `floor(i / C) = floor(j / C)`). A mask only removes entries; the
//! map still decides the position of every visible one. Both may be set at once (an
//! entry is visible iff both allow it).
//!
//! The tiled kernel skips tiles wholly outside the mask (counted in
//! [`TileStats::outside_mask`](super::TileStats::outside_mask)) and masks entries only in
//! tiles the mask edge crosses.

use crate::error::{Result, RopeError};
use crate::position::TileBounds;

/// Which `(i, j)` entries attention may use, besides causality and the map: a sliding
/// window (`|i - j| < window`) and/or chunked attention (`floor(i/C) = floor(j/C)`). The
/// default hides nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mask {
    sliding_window: Option<usize>,
    chunk: Option<usize>,
}

/// How much of a tile a mask leaves visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskCover {
    /// No entry is visible.
    Empty,
    /// Some entries may be hidden.
    Partial,
    /// Every entry is visible.
    Full,
}

impl Mask {
    /// Hides nothing.
    pub const NONE: Mask = Mask {
        sliding_window: None,
        chunk: None,
    };

    /// This mask with a sliding window: `j` visible iff `|i - j| < window`, `window >= 1`.
    pub fn with_sliding_window(mut self, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(RopeError::invalid(
                "sliding window",
                0,
                "must be >= 1 (the window includes the query's own key)",
            ));
        }
        self.sliding_window = Some(window);
        Ok(self)
    }

    /// This mask with chunked attention: `j` visible iff `floor(i/C) = floor(j/C)`,
    /// `C >= 1`.
    pub fn with_chunked(mut self, chunk: usize) -> Result<Self> {
        if chunk == 0 {
            return Err(RopeError::invalid(
                "attention chunk",
                0,
                "must be >= 1 (Llama 4 uses 8192)",
            ));
        }
        self.chunk = Some(chunk);
        Ok(self)
    }

    /// The sliding window, if set.
    pub fn sliding_window(&self) -> Option<usize> {
        self.sliding_window
    }

    /// The attention chunk, if set.
    pub fn chunk(&self) -> Option<usize> {
        self.chunk
    }

    /// Re-checks a mask (both sizes `>= 1`).
    pub fn validate(&self) -> Result<()> {
        let mut m = Mask::NONE;
        if let Some(w) = self.sliding_window {
            m = m.with_sliding_window(w)?;
        }
        if let Some(c) = self.chunk {
            m.with_chunked(c)?;
        }
        Ok(())
    }

    /// Whether the mask lets query position `i` see key position `j`.
    pub fn allows(&self, i: usize, j: usize) -> bool {
        self.sliding_window.is_none_or(|w| i.abs_diff(j) < w)
            && self.chunk.is_none_or(|c| i / c == j / c)
    }

    /// How much of the rectangle `b` the mask leaves visible (only entries with `j <= i`
    /// count when `causal`).
    pub fn cover(&self, b: &TileBounds, causal: bool) -> MaskCover {
        let Some((lo, hi)) = b.r_range(causal) else {
            return MaskCover::Empty;
        };
        let mut full = true;
        if let Some(w) = self.sliding_window {
            let w = w as i128;
            // |r| over [lo, hi]: smallest is 0 if the range spans 0.
            let min_abs = if lo <= 0 && hi >= 0 {
                0
            } else {
                lo.abs().min(hi.abs())
            };
            let max_abs = lo.abs().max(hi.abs());
            if min_abs >= w {
                return MaskCover::Empty;
            }
            full &= max_abs < w;
        }
        if let Some(c) = self.chunk {
            let (ci0, ci1) = (b.q_min / c, b.q_max / c);
            let (cj0, cj1) = (b.k_min / c, b.k_max / c);
            if ci1 < cj0 || cj1 < ci0 {
                return MaskCover::Empty;
            }
            full &= ci0 == ci1 && cj0 == cj1;
        }
        if full {
            MaskCover::Full
        } else {
            MaskCover::Partial
        }
    }
}
