//! Region rules: which piece of a map scores the entry `(i, j)`, or whether the map
//! hides it; and what a rectangle of entries (a kernel tile) may contain.
//!
//! | rule | piece of `(i, j)`, `r = i - j` | maps |
//! |---|---|---|
//! | [`Region::Single`] | 0 | RoPE, interpolation |
//! | [`Region::Band`] | 0 iff `|r| < w`, else 1 | ReRoPE, Leaky, Self-Extend |
//! | [`Region::ChunkDistance`] | `min(floor(i/c) - floor(j/c), 2)` | Dual Chunk Attention |
//! | [`Region::SinksWindow`] | 0 iff `0 <= r < W`, else 1 iff `j < S`, else hidden | StreamingLLM |
//!
//! The chunk and sink rules are defined for causal pairs (`j <= i`) only: they hide every
//! key after its query.

use super::pieces::Piece;

/// How a map picks its piece per `(i, j)` entry (the table in [`crate::position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    /// One piece everywhere.
    Single,
    /// Piece 0 inside the band `|i - j| < window`, piece 1 outside.
    Band {
        /// Band width `w >= 1`.
        window: usize,
    },
    /// Piece `min(chunk(i) - chunk(j), 2)` with `chunk(t) = floor(t / period)`: same
    /// chunk, successive chunk, farther.
    ChunkDistance {
        /// Chunk length `c >= 1`.
        period: usize,
    },
    /// Piece 0 for the last `window` keys (`0 <= i - j < window`), piece 1 for the first
    /// `sinks` keys outside it, every other key hidden.
    SinksWindow {
        /// Number of sink tokens `S`.
        sinks: usize,
        /// Window length `W >= 1`.
        window: usize,
    },
}

/// The position bounds of a rectangle of entries (a kernel tile): query positions in
/// `q_min..=q_max`, key positions in `k_min..=k_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileBounds {
    /// Smallest query position among the tile's rows (`i0`).
    pub q_min: usize,
    /// Largest query position among the tile's rows (`i1`).
    pub q_max: usize,
    /// Smallest key position among the tile's columns (`j0`).
    pub k_min: usize,
    /// Largest key position among the tile's columns (`j1`).
    pub k_max: usize,
}

impl TileBounds {
    /// `r = i - j` over the rectangle: `[i0 - j1, i1 - j0]`, clipped to `r >= 0` when
    /// `causal`; `None` when no entry is left.
    pub fn r_range(&self, causal: bool) -> Option<(i128, i128)> {
        let lo = self.q_min as i128 - self.k_max as i128;
        let hi = self.q_max as i128 - self.k_min as i128;
        match causal {
            true if hi < 0 => None,
            true => Some((lo.max(0), hi)),
            false => Some((lo, hi)),
        }
    }

    /// Whether some entry may lie above the causal diagonal (`k_max > q_min`), so the
    /// causal mask must be applied per entry.
    pub fn needs_causal_mask(&self, causal: bool) -> bool {
        causal && self.k_max > self.q_min
    }
}

/// What a rectangle of entries may contain under a region rule: bit `p` of `pieces` is
/// set iff piece `p` may serve some entry (conservative: a set bit may be unused, a
/// clear bit never is), and `may_hide` says some entry may be hidden by the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cover {
    /// Bit set of the pieces the rectangle may use; 0 when every entry is hidden.
    pub pieces: u8,
    /// Some entry may be hidden by the rule (excluding the causal diagonal).
    pub may_hide: bool,
}

impl Cover {
    /// Number of pieces the rectangle may use.
    pub fn count(&self) -> usize {
        self.pieces.count_ones() as usize
    }
}

impl Region {
    /// The piece serving `(i, j)`, or `None` when the rule hides the entry.
    pub fn piece_index(&self, i: usize, j: usize) -> Option<usize> {
        match *self {
            Region::Single => Some(0),
            Region::Band { window } => Some(usize::from(i.abs_diff(j) >= window)),
            Region::ChunkDistance { period } => {
                let c = period.max(1);
                (j <= i).then(|| (i / c - j / c).min(2))
            }
            Region::SinksWindow { sinks, window } => {
                if j > i {
                    None
                } else if i - j < window {
                    Some(0)
                } else if j < sinks {
                    Some(1)
                } else {
                    None
                }
            }
        }
    }

    /// Whether the rule defines entries with `j > i` (band and single rules do).
    pub fn is_two_sided(&self) -> bool {
        matches!(self, Region::Single | Region::Band { .. })
    }

    /// What the rectangle `b` may contain (only entries with `j <= i` when `causal`).
    pub fn cover(&self, b: &TileBounds, causal: bool) -> Cover {
        let empty = Cover {
            pieces: 0,
            may_hide: true,
        };
        let causal = causal || !self.is_two_sided();
        let Some((lo, hi)) = b.r_range(causal) else {
            return empty;
        };
        let bit = |p: u8, on: bool| if on { 1u8 << p } else { 0 };
        match *self {
            Region::Single => Cover {
                pieces: 1,
                may_hide: false,
            },
            Region::Band { window } => {
                let w = window as i128;
                Cover {
                    pieces: bit(0, lo < w && hi > -w) | bit(1, lo <= -w || hi >= w),
                    may_hide: false,
                }
            }
            Region::ChunkDistance { period } => {
                let c = period.max(1) as i128;
                let (ci0, ci1) = (b.q_min as i128 / c, b.q_max as i128 / c);
                let (cj0, cj1) = (b.k_min as i128 / c, b.k_max as i128 / c);
                let (dlo, dhi) = ((ci0 - cj1).max(0), ci1 - cj0);
                Cover {
                    pieces: bit(0, dlo == 0) | bit(1, dlo <= 1 && dhi >= 1) | bit(2, dhi >= 2),
                    may_hide: false,
                }
            }
            Region::SinksWindow { sinks, window } => {
                let w = window as i128;
                let window_piece = lo < w;
                let sink_piece = b.k_min < sinks && hi >= w;
                let first_hidden = b.k_min.max(sinks);
                let hidden = first_hidden <= b.k_max && b.q_max as i128 - first_hidden as i128 >= w;
                Cover {
                    pieces: bit(0, window_piece) | bit(1, sink_piece),
                    may_hide: hidden,
                }
            }
        }
    }
}

/// A map's decomposition: its plain-RoPE pieces and the rule that picks one per entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Pieces {
    list: Vec<Piece>,
    region: Region,
}

impl Pieces {
    /// Pieces `list` chosen by `region` (piece indices as the rule numbers them).
    pub(crate) fn new(list: Vec<Piece>, region: Region) -> Self {
        Pieces { list, region }
    }

    /// The pieces, in the order the region rule numbers them.
    pub fn list(&self) -> &[Piece] {
        &self.list
    }

    /// The region rule.
    pub fn region(&self) -> Region {
        self.region
    }

    /// Index of the piece serving `(i, j)`, `None` when the map hides the entry.
    pub fn index(&self, i: usize, j: usize) -> Option<usize> {
        self.region.piece_index(i, j)
    }

    /// The piece that serves entry `(i, j)` (for an entry the map hides, the last
    /// piece: its position is not seen by attention).
    pub fn piece_for(&self, i: usize, j: usize) -> Piece {
        let last = self.list.len() - 1;
        self.list[self.index(i, j).unwrap_or(last).min(last)]
    }
}
