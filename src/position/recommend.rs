//! Published parameter choices for a model trained at `L_train` tokens.
//!
//! - ReRoPE window: Su's ablation (post 12) recommends `L_train/4 ..= L_train/2`.
//! - Leaky ReRoPE leak for a target length: the smallest `k` keeping the largest
//!   position inside the trained range.
//! - Inverse Leaky ReRoPE (post 13): `k = 1 / (2 s)` for an extension `s`.
//! - Self-Extend: the largest position `floor((n-1)/G) + W - floor(W/G)` must stay below
//!   `L_train` (the paper's bound `(L_train - W) G + W` on the reachable length). With
//!   the neighbour window at `L_train/4` (LongLM's Llama-2 setting, 1024 of 4096), the
//!   smallest such `G` is chosen.
//! - Dual Chunk Attention (ChunkLlama): `chunk_size = 3 L_train / 4`,
//!   `local_window = L_train / 8`.

use super::PositionMap;
use super::rerope::check_window;
use crate::error::{Result, RopeError};

/// Su's recommended ReRoPE window range for a training length: `L_train/4 ..= L_train/2`
/// (post 12's ablation; `w = L_train` collapses).
pub fn recommended_window(train_len: usize) -> std::ops::RangeInclusive<usize> {
    (train_len / 4).max(1)..=(train_len / 2).max(1)
}

/// The smallest leak `k >= 1` that keeps Leaky ReRoPE's largest position,
/// `w + (L - 1 - w)/k`, inside the trained range `L_train - 1` for a target length `L`:
/// `k = (L - 1 - w) / (L_train - 1 - w)`, or 1 when the target fits already.
///
/// ```
/// let k = ropex::position::leak_for_target(64, 128, 2048).unwrap();
/// let map = ropex::PositionMap::leaky_rerope(64, k).unwrap();
/// assert!((map.max_position(2048) - 127.0).abs() < 1e-9);
/// ```
pub fn leak_for_target(window: usize, train_len: usize, target_len: usize) -> Result<f64> {
    check_window(window)?;
    if train_len < 2 || window + 1 >= train_len {
        return Err(RopeError::invalid(
            "window (w)",
            window,
            format!("must be < train_len - 1 = {}", train_len.saturating_sub(1)),
        ));
    }
    if target_len <= train_len {
        return Ok(1.0);
    }
    Ok((target_len - 1 - window) as f64 / (train_len - 1 - window) as f64)
}

/// The inverse-Leaky leak of post 13 for a target extension `s`: `k = 1 / (2 s)`.
pub fn inverse_leak(extension: f64) -> Result<f64> {
    crate::error::check_positive("extension factor s", extension)?;
    Ok(1.0 / (2.0 * extension))
}

fn check_train_len(train_len: usize, min: usize) -> Result<()> {
    if train_len < min {
        return Err(RopeError::invalid(
            "train_len",
            train_len,
            format!("must be >= {min}"),
        ));
    }
    Ok(())
}

/// Self-Extend for a model trained at `train_len >= 4` read at `target_len`: neighbour
/// window `W = train_len / 4` and the smallest group size `G` whose largest position
/// over `target_len` tokens stays `<= train_len - 1`.
///
/// ```
/// let map = ropex::position::self_extend_for(4096, 16_384).unwrap();
/// assert_eq!(map, ropex::PositionMap::self_extend(6, 1024).unwrap());
/// assert!(map.max_position(16_384) <= 4095.0);
/// ```
pub fn self_extend_for(train_len: usize, target_len: usize) -> Result<PositionMap> {
    check_train_len(train_len, 4)?;
    let window = train_len / 4;
    let limit = (train_len - 1) as f64;
    // Below G = (n - 1 - W) / (L_train - W) the largest position exceeds L_train - 1
    // (floor((n-1)/G) + W - floor(W/G) > (n - 1 - W)/G + W - 1), so start there; a few
    // steps up it fits (the largest position is at most (n - 1 - W)/G + W + 1).
    let spread = target_len.saturating_sub(1).saturating_sub(window);
    let mut group = (spread / (train_len - window)).max(1);
    loop {
        let map = PositionMap::self_extend(group, window)?;
        if map.max_position(target_len) <= limit || group == usize::MAX {
            return Ok(map);
        }
        group += 1;
    }
}

/// ChunkLlama's Dual Chunk Attention for a model trained at `train_len >= 8`:
/// `chunk_size = 3 train_len / 4`, `local_window = train_len / 8`.
///
/// ```
/// let map = ropex::position::dca_for(4096).unwrap();
/// assert_eq!(map, ropex::PositionMap::dca(3072, 512).unwrap());
/// ```
pub fn dca_for(train_len: usize) -> Result<PositionMap> {
    check_train_len(train_len, 8)?;
    PositionMap::dca(train_len / 4 * 3 + (train_len % 4) * 3 / 4, train_len / 8)
}
