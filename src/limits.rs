//! The sizes ropex accepts: every public constructor and kernel checks its input against
//! these and returns a typed [`RopeError`](crate::RopeError) past them, so no size a
//! caller passes can overflow an index computation or ask the allocator for more than the
//! address space.

/// The largest token position (or position magnitude, for fractional positions), `2^32`.
///
/// Angles are `p * inv_freq_j` computed in f64: for a pair turning at most 1 rad per
/// token the angle at `p = 2^32` is still within `2^32 * 2^-53 ~ 5e-7` rad of exact,
/// below the f32 rounding of its cos/sin. Past it the f64 angle itself loses the phase,
/// so ropex refuses such positions instead of returning quietly wrong rotations.
/// A cache may hold at most `MAX_POSITION + 1` tokens, and a [`RotaryTable`](crate::RotaryTable)
/// at most `MAX_POSITION + 1` rows.
pub const MAX_POSITION: usize = 1 << 32;

/// The largest head dim (query/key or rotary), `2^16`; real models use 64 to 512, and every
/// per-pair buffer stays small whatever a caller passes.
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// The largest number of key/value heads a cache accepts, `2^16`.
pub const MAX_HEADS: usize = 1 << 16;
