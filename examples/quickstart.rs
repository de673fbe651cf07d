//! Quick start: how each scheme treats the pairs of a d = 128 head trained at 4096 and
//! read at 32768 (the beta-base view), then rotate queries and keys with one of them.
//!
//! `cargo run --release --example quickstart`

use ndarray::Array3;
use ropex::{Layout, Llama3, Regime, RopeConfig, RotaryTable, Scaling, Yarn};

fn main() -> Result<(), ropex::RopeError> {
    let (train_len, target_len, base) = (4096usize, 32_768usize, 500_000.0);
    let s = (target_len / train_len) as f64;
    let schemes = [
        Scaling::None,
        Scaling::linear(s),
        Scaling::ntk_aware(s),
        Scaling::ntk_mixed(s, 0.625),
        Scaling::dynamic(s, train_len),
        Scaling::Yarn(Yarn::new(s, train_len)),
        Scaling::Llama3(Llama3 {
            original_max_position_embeddings: train_len,
            ..Llama3::meta()
        }),
    ];
    println!("d = 128, base = {base}, trained at {train_len}, read at {target_len} (s = {s})\n");
    println!(
        "{:<12} {:>6} {:>8} {:>6} {:>9} {:>22}",
        "scheme", "extrap", "blended", "interp", "attn fac", "worst slow-pair angle"
    );
    for scaling in schemes {
        let name = scaling.rope_type();
        let cfg = RopeConfig::new(128, base)?.with_scaling(scaling)?;
        let freqs = cfg.frequencies_for_len(target_len);
        let report = freqs.explain(&cfg.plain_frequencies(), train_len, Some(target_len))?;
        let count = |r: Regime| report.iter().filter(|p| p.regime == r).count();
        // Among pairs that never completed a turn in training, the largest angle reached at
        // the target relative to the largest seen in training (> 1: unseen angles).
        let worst = report
            .iter()
            .filter(|p| p.turns_in_training < 1.0)
            .filter_map(|p| p.target_angle_ratio)
            .fold(0.0, f64::max);
        println!(
            "{:<12} {:>6} {:>8} {:>6} {:>9.4} {:>21.2}x",
            name,
            count(Regime::Extrapolated),
            count(Regime::Blended),
            count(Regime::Interpolated),
            freqs.attention_factor(),
            worst
        );
    }

    // Rotate a batch of queries at the far end of the extended context with YaRN.
    let cfg = RopeConfig::new(128, base)?.with_scaling(Scaling::Yarn(Yarn::new(s, train_len)))?;
    let table = RotaryTable::<f32>::new(&cfg.frequencies(), target_len, Layout::Half)?;
    let mut q = Array3::<f32>::from_elem((2, 8, 128), 0.5);
    table.rotate(q.view_mut(), &[target_len - 2, target_len - 1])?;
    println!(
        "\nrotated q[1, 0, ..4] at position {}: {:?}",
        target_len - 1,
        &q.as_slice().expect("contiguous")[8 * 128..8 * 128 + 4]
    );
    Ok(())
}
