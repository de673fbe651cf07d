//! Property tests: random parameters never panic, valid ones give finite frequencies,
//! and rotation is an orthogonal map (times the attention factor) with the RoPE
//! relative-position property.

use ndarray::Array3;
use proptest::prelude::*;
use ropex::{Layout, Llama3, LongRope, PositionMap, RopeConfig, RotaryTable, Scaling, Yarn};

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-1.0),
        Just(1.0),
        -10.0..10.0f64,
        0.5..1e6f64,
        any::<f64>(),
    ]
}

fn any_scaling() -> impl Strategy<Value = Scaling> {
    let l0 = prop_oneof![Just(0usize), 1usize..10_000];
    prop_oneof![
        Just(Scaling::None),
        any_f64().prop_map(Scaling::linear),
        any_f64().prop_map(Scaling::ntk_aware),
        any_f64().prop_map(|factor| Scaling::NtkOld { factor }),
        any_f64().prop_map(|factor| Scaling::NtkFixed { factor }),
        (any_f64(), any_f64()).prop_map(|(f, b)| Scaling::ntk_mixed(f, b)),
        (any_f64(), l0.clone()).prop_map(|(f, l)| Scaling::dynamic(f, l)),
        (
            any_f64(),
            l0.clone(),
            any_f64(),
            any_f64(),
            any::<bool>(),
            any_f64()
        )
            .prop_map(|(f, l, bf, bs, t, m)| {
                let mut y = Yarn::new(f, l).with_betas(bf, bs).with_truncate(t);
                if m > 0.0 {
                    y = y.with_mscale(m, 1.0);
                }
                Scaling::Yarn(y)
            }),
        (any_f64(), any_f64(), any_f64(), l0.clone()).prop_map(|(f, lo, hi, l)| {
            Scaling::Llama3(Llama3 {
                factor: f,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: l,
            })
        }),
        (
            proptest::collection::vec(any_f64(), 0..40),
            proptest::collection::vec(any_f64(), 0..40),
            l0,
            any_f64()
        )
            .prop_map(|(s, l, o, f)| Scaling::LongRope(LongRope {
                short_factor: s,
                long_factor: l,
                original_max_position_embeddings: o,
                factor: f,
                attention_factor: None,
            })),
        (any_f64(), any_f64()).prop_map(|(factor, partial_rotary_factor)| {
            Scaling::Proportional {
                factor,
                partial_rotary_factor,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_configs_never_panic_and_valid_ones_are_finite(
        head_dim in 0usize..80,
        base in any_f64(),
        partial in prop_oneof![Just(1.0), any_f64()],
        scaling in any_scaling(),
        seq_len in 0usize..40_000,
    ) {
        let cfg = RopeConfig::new(head_dim, base)
            .and_then(|c| c.with_partial_rotary_factor(partial))
            .and_then(|c| c.with_scaling(scaling));
        if let Ok(cfg) = cfg {
            for f in [cfg.frequencies(), cfg.frequencies_for_len(seq_len)] {
                prop_assert_eq!(f.rotary_dim(), cfg.rotary_dim());
                prop_assert!(f.inv_freq().iter().all(|w| w.is_finite() && *w >= 0.0), "{:?}", f);
                prop_assert!(f.attention_factor().is_finite() && f.attention_factor() > 0.0);
                let table = RotaryTable::<f32>::new(&f, 8, Layout::Half).unwrap();
                prop_assert!(table.cos_row(7).unwrap().iter().all(|c| c.is_finite()));
            }
        }
    }

    #[test]
    fn frequencies_are_fixed_up_to_the_length_threshold(
        half in 1usize..40,
        scaling in any_scaling(),
        seq_len in 0usize..40_000,
    ) {
        let Ok(cfg) = RopeConfig::new(2 * half, 10_000.0).and_then(|c| c.with_scaling(scaling)) else {
            return Ok(());
        };
        let init = cfg.frequencies();
        match cfg.scaling().length_threshold() {
            // Not length-dependent: every length gives the init frequencies.
            None => prop_assert_eq!(cfg.frequencies_for_len(seq_len), init),
            // Up to L0 the init frequencies (dynamic: plain; LongRoPE: short factors).
            Some(l0) => {
                prop_assert!(cfg.scaling().is_length_dependent());
                let n = seq_len.min(l0);
                prop_assert_eq!(cfg.frequencies_for_len(n), init.clone());
                prop_assert_eq!(cfg.frequencies_for_len(l0), init);
            }
        }
    }

    #[test]
    fn random_position_maps_never_panic(w in 0usize..100, k in any_f64(), i in 0usize..1000, j in 0usize..1000) {
        if let Ok(m) = PositionMap::leaky_rerope(w, k) {
            let p = m.position(i, j);
            prop_assert!(p.is_finite());
            let piece = m.pieces().piece_for(i, j);
            prop_assert!((piece.at(i as f64, j as f64) - p).abs() <= 1e-9 * p.abs().max(1.0));
        }
        if let Ok(m) = PositionMap::rerope(w) {
            prop_assert!(m.position(i, j) <= w as f64);
        }
    }

    #[test]
    fn rotation_is_orthogonal_and_relative(
        half in 1usize..20,
        extra in 0usize..4,
        p in 0usize..5000,
        shift in 0usize..5000,
        interleaved in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let d = 2 * half;
        let head_dim = d + 2 * extra;
        let layout = if interleaved { Layout::Interleaved } else { Layout::Half };
        let cfg = RopeConfig::new(head_dim, 10_000.0).unwrap().with_rotary_dim(d).unwrap();
        let freqs = cfg.frequencies();
        let positions = [p as f64, (p + shift) as f64, shift as f64, 0.0];
        let table = RotaryTable::<f64>::from_positions(&freqs, &positions, layout).unwrap();
        let mut s = seed;
        let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5 };
        let q0: Vec<f64> = (0..head_dim).map(|_| next()).collect();
        let k0: Vec<f64> = (0..head_dim).map(|_| next()).collect();
        let rot = |x: &[f64], row: usize| {
            let mut y = x.to_vec();
            table.rotate_slice(&mut y, [1, 1, head_dim], &[row]).unwrap();
            y
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        // norm preserved
        let q1 = rot(&q0, 0);
        prop_assert!((dot(&q1, &q1) - dot(&q0, &q0)).abs() < 1e-9);
        // (R(p + shift) q) . (R(shift) k) == (R(p) q) . (R(0) k)
        let lhs = dot(&rot(&q0, 1), &rot(&k0, 2));
        let rhs = dot(&rot(&q0, 0), &rot(&k0, 3));
        prop_assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        // pass-through dims untouched
        prop_assert_eq!(&q1[d..], &q0[d..]);
    }

    #[test]
    fn half_and_interleaved_are_a_permutation_apart(half in 1usize..16, p in 0usize..10_000, seed in any::<u64>()) {
        let d = 2 * half;
        let freqs = RopeConfig::new(d, 10_000.0).unwrap().frequencies();
        let th = RotaryTable::<f64>::new(&freqs, p + 1, Layout::Half).unwrap();
        let ti = RotaryTable::<f64>::new(&freqs, p + 1, Layout::Interleaved).unwrap();
        let mut s = seed;
        let x: Vec<f64> = (0..d).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); (s >> 40) as f64 }).collect();
        // interleaved[2j], [2j+1] <-> half[j], [j + d/2]
        let mut xi = vec![0.0; d];
        for j in 0..half { xi[2 * j] = x[j]; xi[2 * j + 1] = x[j + half]; }
        let mut yh = Array3::from_shape_vec((1, 1, d), x).unwrap();
        let mut yi = Array3::from_shape_vec((1, 1, d), xi).unwrap();
        th.rotate(yh.view_mut(), &[p]).unwrap();
        ti.rotate(yi.view_mut(), &[p]).unwrap();
        for j in 0..half {
            prop_assert_eq!(yh[[0, 0, j]], yi[[0, 0, 2 * j]]);
            prop_assert_eq!(yh[[0, 0, j + half]], yi[[0, 0, 2 * j + 1]]);
        }
    }
}
