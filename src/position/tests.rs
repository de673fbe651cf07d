use super::*;

const MAPS: [PositionMap; 5] = [
    PositionMap::Rope,
    PositionMap::ReRope { window: 5 },
    PositionMap::LeakyReRope {
        window: 4,
        leak: 3.0,
    },
    PositionMap::LeakyReRope {
        window: 3,
        leak: 0.25,
    },
    PositionMap::Interpolated { factor: 2.0 },
];

/// The new maps over parameters that hit every region within 40 tokens.
fn new_maps() -> Vec<PositionMap> {
    vec![
        PositionMap::self_extend(4, 6).unwrap(),
        PositionMap::self_extend(3, 7).unwrap(),
        PositionMap::self_extend_scaled(2, 5, 4.0).unwrap(),
        PositionMap::dca(8, 3).unwrap(),
        PositionMap::dca(7, 0).unwrap(),
        PositionMap::dca(12, 5).unwrap(),
        PositionMap::streaming(4, 6).unwrap(),
        PositionMap::streaming(0, 5).unwrap(),
        PositionMap::streaming(3, 1).unwrap(),
    ]
}

fn all_maps() -> Vec<PositionMap> {
    let mut v = MAPS.to_vec();
    v.extend(new_maps());
    v
}

#[test]
fn pieces_reproduce_the_closed_form() {
    for map in all_maps() {
        let pieces = map.pieces();
        for i in 0..40 {
            for j in 0..40 {
                if j > i && map.is_causal_only() {
                    assert!(map.position(i, j).is_nan() && !map.sees(i, j));
                    continue;
                }
                let closed = map.position(i, j);
                match pieces.index(i, j) {
                    Some(p) => {
                        let got = pieces.list()[p].at(i as f64, j as f64);
                        assert!(map.sees(i, j), "{map} ({i}, {j})");
                        assert!(
                            (got - closed).abs() < 1e-12,
                            "{map:?} at ({i}, {j}): {got} vs {closed}"
                        );
                        let via = pieces.piece_for(i, j).at(i as f64, j as f64);
                        assert_eq!(via, got);
                    }
                    None => {
                        assert!(closed.is_nan() && !map.sees(i, j), "{map} ({i}, {j})");
                    }
                }
            }
        }
    }
}

/// Hand-computed values from the published formulas.
#[test]
fn published_values() {
    let m = PositionMap::leaky_rerope(512, 16.0).unwrap();
    assert_eq!(m.position(1000, 0), 542.5);
    assert_eq!(m.position(5000, 0), 792.5);
    // Self-Extend G = 8, W = 1024: i = 5000, j = 100 -> 625 + 1024 - 128 - 12.
    let se = PositionMap::self_extend(8, 1024).unwrap();
    assert_eq!(se.position(5000, 100), 1509.0);
    assert_eq!(se.position(5000, 3977), 1023.0);
    assert_eq!(se.position(5000, 3976), (625 + 896 - 497) as f64);
    // DCA chunk 8, local 3: c = 5. (12, 11): same chunk -> 1. (12, 9): chunks 2, 1 ->
    // min(2 + 5, 8) - 4 = 3. (12, 3): chunks 2, 0 -> min(9, 8) - 3 = 5.
    let d = PositionMap::dca(8, 3).unwrap();
    assert_eq!(d.position(12, 11), 1.0);
    assert_eq!(d.position(12, 9), 3.0);
    assert_eq!(d.position(12, 3), 5.0);
    assert_eq!(d.position(14, 5), 8.0 - 0.0);
    // StreamingLLM S = 4, W = 6: query 20 sees sinks 0..4 at 9 - j and keys 15..=20.
    let s = PositionMap::streaming(4, 6).unwrap();
    assert_eq!(s.position(20, 0), 9.0);
    assert_eq!(s.position(20, 3), 6.0);
    assert!(s.position(20, 4).is_nan() && s.position(20, 14).is_nan());
    assert_eq!(s.position(20, 15), 5.0);
    assert_eq!(s.position(7, 0), 7.0);
}

#[test]
fn matrix_with_offset() {
    let m = PositionMap::rerope(2).unwrap();
    let p = m.position_matrix(2, 5, 3).unwrap();
    assert_eq!(p.row(0).to_vec(), vec![2.0, 2.0, 1.0, 0.0, -1.0]);
    assert_eq!(p.row(1).to_vec(), vec![2.0, 2.0, 2.0, 1.0, 0.0]);
}

#[test]
fn matrix_sizes_and_offsets_past_the_limit_are_typed_errors() {
    let m = PositionMap::Rope;
    for (n_q, n_k, off) in [
        (1usize << 40, 1usize << 40, 0usize),
        (usize::MAX, usize::MAX, 0),
        (usize::MAX / 2, 3, 0),
        (2, 2, usize::MAX),
        (1, 1, MAX_POSITION + 1),
        (1, MAX_POSITION + 2, 0),
    ] {
        assert!(
            matches!(
                m.position_matrix(n_q, n_k, off),
                Err(RopeError::InvalidParameter { .. })
            ),
            "{n_q} {n_k} {off}"
        );
    }
    assert_eq!(m.position_matrix(0, 0, MAX_POSITION).unwrap().len(), 0);
    assert!(check_positions("q_pos", &[0, MAX_POSITION]).is_ok());
    assert!(check_positions("q_pos", &[0, MAX_POSITION + 1]).is_err());
}

/// `max_position` equals the brute-force maximum over visible causal pairs.
#[test]
fn max_position_is_the_brute_force_maximum() {
    for map in all_maps() {
        for len in 1..60 {
            let brute = (0..len)
                .flat_map(|i| (0..=i).map(move |j| (i, j)))
                .filter(|&(i, j)| map.sees(i, j))
                .map(|(i, j)| map.position(i, j))
                .fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(map.max_position(len), brute, "{map} len {len}");
        }
    }
}

/// Exact limits: G = 1 or W >= n, c >= n, S + W >= n are plain RoPE on causal pairs.
#[test]
fn exact_limits_are_rope() {
    let n = 30;
    let limits = [
        PositionMap::self_extend(1, 4).unwrap(),
        PositionMap::self_extend(5, n).unwrap(),
        PositionMap::self_extend_scaled(3, n + 10, 2.0).unwrap(),
        PositionMap::dca(n + 3, 3).unwrap(),
        PositionMap::dca(n, 0).unwrap(),
        PositionMap::streaming(4, n - 4).unwrap(),
        PositionMap::streaming(0, n).unwrap(),
    ];
    for map in limits {
        for i in 0..n {
            for j in 0..=i {
                assert!(map.sees(i, j));
                assert_eq!(map.position(i, j), (i - j) as f64, "{map} ({i}, {j})");
            }
        }
    }
    // One step past the limit is not RoPE any more.
    assert_ne!(
        PositionMap::self_extend(2, n - 5)
            .unwrap()
            .position(n - 1, 0),
        (n - 1) as f64
    );
    assert_ne!(
        PositionMap::dca(n - 5 + 3, 3).unwrap().position(n - 1, 0),
        (n - 1) as f64
    );
    assert!(!PositionMap::streaming(4, n - 5).unwrap().sees(n - 1, 4));
}

#[test]
fn self_extend_query_scale() {
    let m = PositionMap::self_extend_scaled(4, 8, 16.0).unwrap();
    assert_eq!(m.query_scale(0), 1.0);
    assert_eq!(m.query_scale(15), 1.0);
    assert!((m.query_scale(255) - 2.0).abs() < 1e-12);
    assert_eq!(
        PositionMap::self_extend(4, 8).unwrap().query_scale(255),
        1.0
    );
}

#[test]
fn text_form_round_trips() {
    for map in all_maps() {
        let text = map.to_string();
        let back: PositionMap = text.parse().unwrap();
        assert_eq!(back, map, "{text}");
    }
    assert_eq!(
        "leaky_rerope:8:2.5".parse::<PositionMap>().unwrap(),
        PositionMap::leaky_rerope(8, 2.5).unwrap()
    );
    assert_eq!(
        "streaming:4:1024"
            .parse::<PositionMap>()
            .unwrap()
            .to_string(),
        "streaming:4:1024"
    );
    for bad in [
        "",
        "ropes",
        "rerope",
        "rerope:x",
        "rerope:0",
        "rerope:-1",
        "leaky:4",
        "leaky:4:0",
        "interp:abc",
        "self-extend:0:4",
        "self-extend:4:0",
        "self-extend:4:8:1",
        "self-extend:4:8:nan",
        "dca:8:8",
        "dca:0:0",
        "dca:8",
        "streaming:4:0",
        "streaming:0:0",
        "streaming:4:8:1",
    ] {
        assert!(
            matches!(
                bad.parse::<PositionMap>(),
                Err(RopeError::InvalidParameter { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn bad_parameters_are_typed_errors() {
    let invalid = |r: Result<PositionMap>| matches!(r, Err(RopeError::InvalidParameter { .. }));
    assert!(invalid(PositionMap::self_extend(0, 4)));
    assert!(invalid(PositionMap::self_extend(4, 0)));
    assert!(invalid(PositionMap::self_extend_scaled(4, 8, 0.5)));
    assert!(invalid(PositionMap::self_extend_scaled(
        4,
        8,
        f64::INFINITY
    )));
    assert!(invalid(PositionMap::dca(0, 0)));
    assert!(invalid(PositionMap::dca(8, 8)));
    assert!(invalid(PositionMap::dca(8, 9)));
    assert!(invalid(PositionMap::streaming(0, 0)));
    assert!(invalid(PositionMap::streaming(4, 0)));
    assert!(invalid(PositionMap::streaming(usize::MAX, 1)));
    for bad in [
        PositionMap::SelfExtend {
            group: 0,
            window: 3,
            scale_base: None,
        },
        PositionMap::DualChunk {
            chunk_size: 4,
            local_window: 4,
        },
        PositionMap::Streaming {
            sinks: 0,
            window: 0,
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
        // Invalid public fields give a meaningless map, never a panic.
        let _ = (
            bad.position(5, 2),
            bad.max_position(10),
            bad.pieces().index(5, 2),
        );
    }
}

/// A region's cover of every small rectangle contains every piece an entry of it uses,
/// flags hidden entries, and is empty only when nothing in the rectangle is visible.
#[test]
fn covers_are_sound() {
    for map in all_maps() {
        let pieces = map.pieces();
        for causal in [true, false] {
            if !causal && map.is_causal_only() {
                continue;
            }
            for (q_min, q_max) in [(0, 3), (5, 9), (10, 10), (12, 25), (30, 39)] {
                for (k_min, k_max) in [(0, 0), (0, 3), (2, 7), (8, 15), (14, 30), (33, 39)] {
                    let b = TileBounds {
                        q_min,
                        q_max,
                        k_min,
                        k_max,
                    };
                    let cover = pieces.region().cover(&b, causal);
                    for i in q_min..=q_max {
                        for j in k_min..=k_max {
                            if causal && j > i {
                                continue;
                            }
                            match pieces.index(i, j) {
                                Some(p) => assert!(cover.pieces & (1 << p) != 0, "{map} {b:?}"),
                                None => assert!(cover.may_hide, "{map} {b:?} ({i}, {j})"),
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn helpers() {
    assert_eq!(recommended_window(512), 128..=256);
    assert_eq!(inverse_leak(16.0).unwrap(), 1.0 / 32.0);
    assert!(inverse_leak(0.0).is_err());
    assert_eq!(leak_for_target(32, 128, 100).unwrap(), 1.0);
    assert!(leak_for_target(127, 128, 1000).is_err());
    assert!(leak_for_target(0, 128, 1000).is_err());
    assert!(PositionMap::rerope(0).is_err());
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(PositionMap::leaky_rerope(4, bad).is_err());
    }
    assert!(
        PositionMap::LeakyReRope {
            window: 0,
            leak: 2.0
        }
        .validate()
        .is_err()
    );
}

/// Self-Extend's recommendation is the smallest G that keeps the largest position
/// inside the trained range (checked against G - 1), with W = L/4; DCA's is 3L/4, L/8.
#[test]
fn recommendations() {
    for (train, target) in [
        (128, 2048),
        (4096, 16_384),
        (4096, 32_768),
        (100, 101),
        (64, 64),
    ] {
        let map = self_extend_for(train, target).unwrap();
        let PositionMap::SelfExtend { group, window, .. } = map else {
            panic!("{map:?}");
        };
        assert_eq!(window, train / 4);
        assert!(map.max_position(target) <= (train - 1) as f64, "{map}");
        if group > 1 {
            let smaller = PositionMap::self_extend(group - 1, window).unwrap();
            assert!(smaller.max_position(target) > (train - 1) as f64, "{map}");
        }
    }
    assert!(self_extend_for(3, 100).is_err());
    assert!(self_extend_for(4096, usize::MAX).is_ok());
    assert_eq!(dca_for(128).unwrap(), PositionMap::dca(96, 16).unwrap());
    assert_eq!(dca_for(4096).unwrap(), PositionMap::dca(3072, 512).unwrap());
    assert!(dca_for(7).is_err());
}
