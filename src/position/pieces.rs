//! The plain-RoPE pieces of a map: a query-position function `f(i)` and a key-position
//! function `g(j)` per piece, `P(i, j) = f(i) - g(j)`.
//!
//! Because `(R(f) q) . (R(g) k) = (R(f - g) q) . k`, attention under a piece is plain
//! RoPE attention with the queries rotated by `f(i)` and the keys by `g(j)`: the kernels
//! rotate each piece's queries and keys once and never per `(i, j)` entry. The functions
//! need not be affine: Self-Extend groups positions (`floor(x / G)`), Dual Chunk
//! Attention folds them into a chunk (`x mod c`).

/// `x -> scale * x + offset`: a piece's query or key position as an affine function of
/// the token position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Multiplier of the token position.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

impl Affine {
    /// The identity `x -> x`.
    pub const IDENTITY: Affine = Affine {
        scale: 1.0,
        offset: 0.0,
    };

    /// The constant `x -> c`.
    pub fn constant(c: f64) -> Affine {
        Affine {
            scale: 0.0,
            offset: c,
        }
    }

    /// Evaluates the map at `x`.
    pub fn at(self, x: f64) -> f64 {
        self.scale * x + self.offset
    }

    /// True when every token maps to the same position (e.g. ReRoPE's far keys at 0).
    pub fn is_constant(self) -> bool {
        self.scale == 0.0
    }
}

/// A position function of one piece: the position a query (or key) at token position
/// `x` is rotated by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PositionFn {
    /// `scale * x + offset` (RoPE, ReRoPE, Leaky ReRoPE, interpolation).
    Affine(Affine),
    /// `floor(x / group) + shift` (Self-Extend's grouped positions).
    Grouped {
        /// Group size `G >= 1`.
        group: usize,
        /// Added after grouping.
        shift: usize,
    },
    /// `min((x mod period) + add, cap)` (Dual Chunk Attention's in-chunk positions).
    Chunked {
        /// Chunk length `c >= 1`.
        period: usize,
        /// Added to the in-chunk position.
        add: usize,
        /// Upper clamp.
        cap: usize,
    },
    /// `min(x, cap)` (StreamingLLM's query position against the sinks).
    Capped {
        /// Upper clamp.
        cap: usize,
    },
}

impl PositionFn {
    /// The identity `x -> x`.
    pub const IDENTITY: PositionFn = PositionFn::Affine(Affine::IDENTITY);

    /// `x mod period`.
    pub fn modulo(period: usize) -> PositionFn {
        PositionFn::Chunked {
            period,
            add: 0,
            cap: usize::MAX,
        }
    }

    /// Evaluates the function at token position `x` (exact for integer `x < 2^53`).
    pub fn at(self, x: f64) -> f64 {
        match self {
            PositionFn::Affine(a) => a.at(x),
            PositionFn::Grouped { group, shift } => {
                let g = group.max(1) as f64;
                let mut q = (x / g).floor();
                // Correct a rounding of x / g across an integer.
                if q * g > x {
                    q -= 1.0;
                } else if (q + 1.0) * g <= x {
                    q += 1.0;
                }
                q + shift as f64
            }
            PositionFn::Chunked { period, add, cap } => {
                let m = x.rem_euclid(period.max(1) as f64);
                (m + add as f64).min(cap as f64)
            }
            PositionFn::Capped { cap } => x.min(cap as f64),
        }
    }

    /// The affine form, when the function is affine.
    pub fn affine(self) -> Option<Affine> {
        match self {
            PositionFn::Affine(a) => Some(a),
            _ => None,
        }
    }

    /// True when every token maps to the same position.
    pub fn is_constant(self) -> bool {
        matches!(self, PositionFn::Affine(a) if a.is_constant())
    }
}

impl From<Affine> for PositionFn {
    fn from(a: Affine) -> Self {
        PositionFn::Affine(a)
    }
}

/// One plain-RoPE piece of a map: `P(i, j) = query.at(i) - key.at(j)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Piece {
    /// `f(i)`: the position the query is rotated by.
    pub query: PositionFn,
    /// `g(j)`: the position the key is rotated by.
    pub key: PositionFn,
}

impl Piece {
    /// Plain RoPE: `f(i) = i`, `g(j) = j`.
    pub const ROPE: Piece = Piece {
        query: PositionFn::IDENTITY,
        key: PositionFn::IDENTITY,
    };

    /// A piece with affine query and key positions.
    pub fn affine(query: Affine, key: Affine) -> Piece {
        Piece {
            query: query.into(),
            key: key.into(),
        }
    }

    /// `P(i, j)` under this piece.
    pub fn at(self, i: f64, j: f64) -> f64 {
        self.query.at(i) - self.key.at(j)
    }
}
