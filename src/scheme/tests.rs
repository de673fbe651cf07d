//! Every scheme against published values and closed forms.

use std::f64::consts::PI;

use super::*;

fn cfg(s: Scaling) -> RopeConfig {
    RopeConfig::new(128, 10_000.0)
        .unwrap()
        .with_scaling(s)
        .unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

#[test]
fn ntk_mixed_matches_published_values() {
    let f = cfg(Scaling::ntk_mixed(12.0, 0.75)).frequencies();
    let a = 12f64.ln() / 64f64.powf(0.75);
    assert!((a - 0.1098184).abs() < 1e-7);
    assert!((f.inv_freq()[0] - 0.8959968).abs() < 1e-7);
    let theta63 = 10_000f64.powf(-126.0 / 128.0);
    assert!(rel(f.inv_freq()[63], theta63 / 12.0) < 1e-12);
    let f = cfg(Scaling::ntk_mixed(8.0, 0.625)).frequencies();
    assert!((f.inv_freq()[0] - 0.8567960).abs() < 1e-7);
}

#[test]
fn ntk_mixed_limits_are_fixed_and_pi() {
    let fixed = cfg(Scaling::NtkFixed { factor: 8.0 }).frequencies();
    let b1 = cfg(Scaling::ntk_mixed(8.0, 1.0)).frequencies();
    let pi = cfg(Scaling::linear(8.0)).frequencies();
    let b0 = cfg(Scaling::ntk_mixed(8.0, 0.0)).frequencies();
    for j in 0..64 {
        assert!(rel(fixed.inv_freq()[j], b1.inv_freq()[j]) < 1e-12);
        assert!(rel(pi.inv_freq()[j], b0.inv_freq()[j]) < 1e-12);
        let closed =
            10_000f64.powf(-(2.0 * j as f64) / 128.0) * 8f64.powf(-2.0 * (j as f64 + 1.0) / 128.0);
        assert!(rel(fixed.inv_freq()[j], closed) < 1e-12);
    }
}

#[test]
fn ntk_aware_base_matches_published_value() {
    let f = cfg(Scaling::ntk_aware(4.0)).frequencies();
    // inv_freq[1] = base'^(-2/128)
    let base_prime = f.inv_freq()[1].powf(-64.0);
    assert!((base_prime - 40889.94).abs() < 0.01, "{base_prime}");
    // The last pair is interpolated by exactly s.
    let plain = cfg(Scaling::None).frequencies();
    assert!(rel(plain.inv_freq()[63] / f.inv_freq()[63], 4.0) < 1e-12);
    assert_eq!(f.inv_freq()[0], 1.0);
}

#[test]
fn ntk_old_is_base_times_s() {
    let f = cfg(Scaling::NtkOld { factor: 8.0 }).frequencies();
    let g = RopeConfig::new(128, 80_000.0).unwrap().frequencies();
    assert_eq!(f, g);
}

#[test]
fn dynamic_matches_published_base_and_clamps() {
    let c = cfg(Scaling::dynamic(2.0, 4096));
    let f = c.frequencies_for_len(8192);
    let base_prime = f.inv_freq()[1].powf(-64.0);
    assert!((base_prime - 30527.74).abs() < 0.01, "{base_prime}");
    let plain = cfg(Scaling::None).frequencies();
    assert_eq!(c.frequencies_for_len(100), plain);
    assert_eq!(c.frequencies_for_len(4096), plain);
    assert_eq!(c.frequencies(), plain);
    assert!(
        c.frequencies_for_len(100)
            .inv_freq()
            .iter()
            .all(|f| f.is_finite())
    );
}

#[test]
fn yarn_matches_published_values() {
    let y = Yarn::new(4.0, 4096);
    assert_eq!(y.correction_range(128, 10_000.0), (20.0, 46.0));
    let (lo, hi) = y
        .clone()
        .with_truncate(false)
        .correction_range(128, 10_000.0);
    assert!((lo - 20.9445).abs() < 1e-4 && (hi - 45.0269).abs() < 1e-4);
    let f = cfg(Scaling::Yarn(y.clone())).frequencies();
    assert!(rel(f.inv_freq()[30], 0.0094885179) < 1e-8);
    assert!(rel(f.inv_freq()[20], 0.0562341325) < 1e-8);
    assert!((f.attention_factor() - 1.1386294).abs() < 1e-7);
    let g = cfg(Scaling::Yarn(y.clone().with_truncate(false))).frequencies();
    assert!(rel(g.inv_freq()[30], 0.0095744612) < 1e-8);
    let h = cfg(Scaling::Yarn(y.with_attention_factor(1.0))).frequencies();
    assert_eq!(h.attention_factor(), 1.0);
}

#[test]
fn yarn_mscale_ratio() {
    let y = Yarn::new(40.0, 4096).with_mscale(1.0, 1.0);
    assert_eq!(y.resolved_attention_factor(), 1.0);
    let y = Yarn::new(40.0, 4096).with_mscale(0.707, 1.0);
    let m = |x: f64| 0.1 * x * 40f64.ln() + 1.0;
    assert!(rel(y.resolved_attention_factor(), m(0.707) / m(1.0)) < 1e-15);
}

#[test]
fn llama3_band_matches_meta() {
    let c = RopeConfig::new(128, 500_000.0)
        .unwrap()
        .with_scaling(Scaling::Llama3(Llama3::meta()))
        .unwrap();
    let f = c.frequencies();
    let plain = c.plain_frequencies();
    let ratio: Vec<f64> = (0..64)
        .map(|j| plain.inv_freq()[j] / f.inv_freq()[j])
        .collect();
    assert!((ratio[29] - 1.20748).abs() < 1e-5, "{}", ratio[29]);
    assert!((ratio[34] - 5.25733).abs() < 1e-5, "{}", ratio[34]);
    assert!(ratio[28] == 1.0);
    for r in &ratio[35..] {
        assert!((r - 8.0).abs() < 1e-12);
    }
    let report = f.explain(&plain, 8192, None).unwrap();
    let blended: Vec<usize> = report
        .iter()
        .filter(|r| r.regime == Regime::Blended)
        .map(|r| r.pair)
        .collect();
    assert_eq!(blended, (29..=34).collect::<Vec<_>>());
    assert!(
        report[..29]
            .iter()
            .all(|r| r.regime == Regime::Extrapolated)
    );
    assert!(
        report[35..]
            .iter()
            .all(|r| r.regime == Regime::Interpolated)
    );
}

#[test]
fn turns_and_digits_agree() {
    let f = cfg(Scaling::None).frequencies();
    let turns = f.turns(4096.0);
    let d = digits(4096.0, 10_000.0, 128).unwrap();
    assert!(digits(1.0, 10_000.0, usize::MAX - 1).is_err());
    assert_eq!(digits(1.0, 10_000.0, 7).unwrap().len(), 3);
    for j in 0..64 {
        assert!(rel(turns[j] * 2.0 * PI, d[j]) < 1e-12);
    }
    assert!(rel(beta(10_000.0, 128), 10_000f64.powf(1.0 / 64.0)) < 1e-15);
}

#[test]
fn length_threshold_is_l0_of_the_length_dependent_schemes() {
    let long = LongRope {
        short_factor: vec![1.0; 4],
        long_factor: vec![2.0; 4],
        original_max_position_embeddings: 4096,
        factor: 8.0,
        attention_factor: None,
    };
    assert_eq!(Scaling::dynamic(2.0, 100).length_threshold(), Some(100));
    assert_eq!(Scaling::LongRope(long).length_threshold(), Some(4096));
    for s in [
        Scaling::None,
        Scaling::linear(2.0),
        Scaling::ntk_aware(2.0),
        Scaling::ntk_mixed(2.0, 0.5),
        Scaling::Yarn(Yarn::new(4.0, 4096)),
        Scaling::Llama3(Llama3::meta()),
    ] {
        assert_eq!(s.length_threshold(), None, "{s:?}");
        assert!(!s.is_length_dependent());
    }
    // The frequencies are fixed up to the threshold and change right after it.
    let c = cfg(Scaling::dynamic(2.0, 100));
    assert_eq!(c.frequencies_for_len(100), c.frequencies_for_len(1));
    assert_ne!(c.frequencies_for_len(101), c.frequencies_for_len(100));
}

#[test]
fn rope_type_names_round_trip() {
    for t in RopeType::ALL {
        assert_eq!(RopeType::from_name(t.name()), Some(t));
    }
    assert_eq!(RopeType::from_name("su"), None);
    assert_eq!(Scaling::Llama3(Llama3::meta()).rope_type(), "llama3");
    assert_eq!(Scaling::None.rope_type(), "default");
}

#[cfg(feature = "serde")]
#[test]
fn serde_round_trips_and_validates() {
    let long = LongRope {
        short_factor: vec![1.0, 1.5],
        long_factor: vec![2.0, 4.0],
        original_max_position_embeddings: 4096,
        factor: 8.0,
        attention_factor: Some(1.2),
    };
    let all = [
        Scaling::None,
        Scaling::linear(2.0),
        Scaling::ntk_aware(2.0),
        Scaling::NtkOld { factor: 3.0 },
        Scaling::NtkFixed { factor: 3.0 },
        Scaling::ntk_mixed(8.0, 0.625),
        Scaling::dynamic(2.0, 4096),
        Scaling::Yarn(Yarn::new(4.0, 4096).with_mscale(1.0, 0.5)),
        Scaling::Llama3(Llama3::meta()),
        Scaling::LongRope(long),
        Scaling::Proportional {
            factor: 1.0,
            partial_rotary_factor: 0.25,
        },
    ];
    for s in all {
        let json = serde_json::to_value(&s).unwrap();
        // Tagged by the rope-type name transformers (or ropex) uses.
        assert_eq!(json["rope_type"], s.rope_type(), "{json}");
        let back: Scaling = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let cfg = RopeConfig::new(4, 10_000.0)
            .unwrap()
            .with_scaling(s)
            .unwrap();
        let text = serde_json::to_string(&cfg).unwrap();
        let back: RopeConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        // serde_json writes the shortest exact decimal but, without its `float_roundtrip`
        // feature, may read a long one back 1 ulp off.
        let f = cfg.frequencies();
        let back: Frequencies = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert!(rel(back.attention_factor(), f.attention_factor()) < 1e-15);
        for (a, b) in back.inv_freq().iter().zip(f.inv_freq()) {
            assert!(a == b || rel(*a, *b) < 1e-15);
        }
    }
    // The odd partial-rotary exponent survives; invalid data is refused.
    let odd = RopeConfig::new(100, 10_000.0)
        .unwrap()
        .with_partial_rotary_factor(0.25)
        .unwrap();
    let back: RopeConfig = serde_json::from_str(&serde_json::to_string(&odd).unwrap()).unwrap();
    assert_eq!((back.rotary_dim(), back.exponent_dim()), (26, 25));
    for bad in [
        r#"{"head_dim": 7, "rotary_dim": 7, "exponent_dim": 7, "base": 10000.0, "scaling": {"rope_type": "default"}}"#,
        r#"{"head_dim": 8, "rotary_dim": 8, "exponent_dim": 6, "base": 10000.0, "scaling": {"rope_type": "default"}}"#,
        r#"{"head_dim": 8, "rotary_dim": 8, "exponent_dim": 8, "base": 0.5, "scaling": {"rope_type": "default"}}"#,
        r#"{"head_dim": 8, "rotary_dim": 8, "exponent_dim": 8, "base": 10000.0, "scaling": {"rope_type": "linear", "factor": 0.5}}"#,
    ] {
        assert!(serde_json::from_str::<RopeConfig>(bad).is_err(), "{bad}");
    }
    let lenient = r#"{"head_dim": 8, "rotary_dim": 8, "exponent_dim": 8, "base": 10000.0,
        "scaling": {"rope_type": "linear", "factor": 0.5}, "checks": "Transformers"}"#;
    assert!(serde_json::from_str::<RopeConfig>(lenient).is_ok());
    assert!(
        serde_json::from_str::<Frequencies>(r#"{"inv_freq": [-1.0], "attention_factor": 1.0}"#)
            .is_err()
    );
}
