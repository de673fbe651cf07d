//! Random JSON and random rope configs fed to the config reader: it must never panic, and
//! whatever it accepts must give finite frequencies, a finite positive attention factor and
//! a finite rotary table at every sequence length, and any position map it accepts (from
//! `ropex_position_map` or vLLM's `dual_chunk_attention_config`) must be valid and
//! round-trip through its text form.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use ropex::config::{self, ParseOptions};
use ropex::{Layout, PositionMap, RotaryTable};
use serde_json::{Map, Value, json};

/// Keys a config reader cares about, plus a few it does not.
const KEYS: &[&str] = &[
    "model_type",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "type",
    "factor",
    "original_max_position_embeddings",
    "max_position_embeddings",
    "head_dim",
    "hidden_size",
    "num_attention_heads",
    "partial_rotary_factor",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "short_factor",
    "long_factor",
    "low_freq_factor",
    "high_freq_factor",
    "mixed_b",
    "ropex_position_map",
    "window",
    "leak",
    "layer_types",
    "full_attention",
    "sliding_attention",
    "num_hidden_layers",
    "qk_rope_head_dim",
    "global_head_dim",
    "rope_local_base_freq",
    "foo",
];

const MODEL_TYPES: &[&str] = &[
    "llama",
    "qwen2",
    "phi",
    "phi3",
    "stablelm",
    "gemma3_text",
    "gemma4_text",
    "deepseek_v3",
    "gpt_oss",
    "mistral",
    "",
];

const ROPE_TYPES: &[&str] = &[
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "proportional",
    "ntk_aware",
    "ntk_old",
    "ntk_fixed",
    "ntk_mixed",
    "su",
    "spiral",
    "",
];

/// Numbers that break things: zero, negatives, huge, tiny, non-integral, typical.
fn weird_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec![
            0.0, 1.0, 2.0, 4.0, 8.0, 32.0, 0.5, 0.25, 0.625, 1.5, 10_000.0, 500_000.0, 1e6,
            4096.0, 8192.0, 131_072.0, -1.0, -4096.0, 1e300, -1e300, f64::MAX, f64::MIN_POSITIVE,
            1e-300, 3.999_999_9, 1e19, 2.0f64.powi(64),
        ])
        .prop_map(Value::from),
        3 => prop::sample::select(vec![0i64, 1, 2, 3, 4, 5, 7, 8, 64, 65, 96, 100, 128, 256,
            4096, 8192, 32768, 65_536, 65_537, 1 << 40, -1, i64::MIN, i64::MAX])
        .prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        2 => any::<f64>().prop_map(Value::from), // NaN/inf become null
        1 => (-1_000_000i64..1_000_000).prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        4 => weird_number(),
        2 => prop::sample::select(ROPE_TYPES.to_vec()).prop_map(Value::from),
        1 => prop::sample::select(vec!["4", "NaN", "inf", "-1", "full_attention", "rerope"])
            .prop_map(Value::from),
    ]
}

/// Arbitrary JSON trees whose object keys come mostly from [`KEYS`].
fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        5 => prop::sample::select(KEYS.to_vec()).prop_map(str::to_string),
                        1 => "[a-z_]{1,8}",
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn maybe<T: Strategy<Value = Value>>(s: T) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.6, s)
}

/// A small number, weird or typical, for map parameters.
fn map_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(vec![0i64, 1, 2, 3, 4, 8, 16, 64, 1024]).prop_map(Value::from),
        1 => weird_number(),
        1 => leaf(),
    ]
}

/// A `ropex_position_map` value: an object of any map type with a random subset of the
/// parameter keys, the text form with random numbers, or anything.
fn position_map_value() -> impl Strategy<Value = Value> {
    let object = (
        prop::sample::select(vec![
            "rope",
            "rerope",
            "leaky_rerope",
            "interpolated",
            "self_extend",
            "dual_chunk",
            "streaming",
            "dca",
            "",
        ]),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "window",
                    "leak",
                    "factor",
                    "group_size",
                    "scale_base",
                    "chunk_size",
                    "local_window",
                    "local_size",
                    "sinks",
                    "foo",
                ]),
                map_number(),
            ),
            0..5,
        ),
    )
        .prop_map(|(ty, kv)| {
            let mut d: Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            d.insert("type".into(), Value::from(ty));
            Value::Object(d)
        });
    let text = (
        prop::sample::select(vec![
            "rope",
            "rerope",
            "leaky",
            "interp",
            "self-extend",
            "dca",
            "streaming",
            "spiral",
        ]),
        prop::collection::vec(
            prop::sample::select(vec![
                "0", "1", "2", "8", "64", "0.5", "-1", "1e300", "x", "",
            ]),
            0..4,
        ),
    )
        .prop_map(|(ty, parts)| {
            let mut s = ty.to_string();
            for p in parts {
                s.push(':');
                s.push_str(p);
            }
            Value::from(s)
        });
    prop_oneof![3 => object, 3 => text, 1 => json_value()]
}

/// vLLM's `dual_chunk_attention_config` with random values.
fn dca_block() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (
            map_number(),
            map_number(),
            maybe(map_number()),
            maybe(leaf()),
        )
            .prop_map(|(chunk, local, original, sparse)| {
                let mut d = Map::new();
                d.insert("chunk_size".into(), chunk);
                d.insert("local_size".into(), local);
                if let Some(o) = original {
                    d.insert("original_max_position_embeddings".into(), o);
                }
                if let Some(s) = sparse {
                    d.insert("sparse_attention_enabled".into(), s);
                }
                Value::Object(d)
            }),
        1 => json_value(),
    ]
}

/// A rope dict: a random type and a random subset of plausible keys with weird values.
fn rope_dict() -> impl Strategy<Value = Value> {
    let list = prop_oneof![
        prop::collection::vec(weird_number(), 0..4).prop_map(Value::Array),
        (1usize..70, weird_number()).prop_map(|(n, v)| Value::Array(vec![v; n])),
        (
            prop::sample::select(vec![1usize, 10, 12, 13, 16, 24, 32, 48, 64]),
            0.5f64..70.0
        )
            .prop_map(|(n, v)| Value::Array(vec![Value::from(v); n])),
    ];
    (
        prop::sample::select(ROPE_TYPES.to_vec()),
        any::<bool>(),
        prop::collection::vec(
            (prop::sample::select(KEYS[5..27].to_vec()), weird_number()),
            0..6,
        ),
        maybe(list.clone()),
        maybe(list),
        maybe(leaf()),
        maybe(prop_oneof![
            Just(json!({"type": "rerope", "window": 4})),
            Just(json!({"type": "leaky_rerope", "window": 4, "leak": 0.5})),
            Just(json!({"type": "self_extend", "group_size": 2, "window": 4})),
            Just(json!("dca:8:2")),
            position_map_value(),
        ]),
    )
        .prop_map(|(ty, legacy, kv, short, long, truncate, map)| {
            let mut d = Map::new();
            for (k, v) in kv {
                d.insert(k.to_string(), v);
            }
            if !ty.is_empty() {
                d.insert(
                    if legacy { "type" } else { "rope_type" }.into(),
                    Value::from(ty),
                );
            }
            for (k, v) in [
                ("short_factor", short),
                ("long_factor", long),
                ("truncate", truncate),
                ("ropex_position_map", map),
            ] {
                if let Some(v) = v {
                    d.insert(k.into(), v);
                }
            }
            Value::Object(d)
        })
}

/// A whole config: model type, dims, lengths and one rope dict in one of the forms.
fn model_config() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(MODEL_TYPES.to_vec()),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "hidden_size",
                    "num_attention_heads",
                    "head_dim",
                    "max_position_embeddings",
                    "original_max_position_embeddings",
                    "rope_theta",
                    "partial_rotary_factor",
                    "qk_rope_head_dim",
                    "global_head_dim",
                    "num_hidden_layers",
                    "rope_local_base_freq",
                ]),
                prop_oneof![4 => weird_number(), 1 => leaf()],
            ),
            0..7,
        ),
        rope_dict(),
        rope_dict(),
        0u8..5,
        prop::option::weighted(0.2, position_map_value()),
        prop::option::weighted(0.2, dca_block()),
    )
        .prop_map(|(mt, kv, a, b, form, map, dca)| {
            let mut top = Map::new();
            if !mt.is_empty() {
                top.insert("model_type".into(), Value::from(mt));
            }
            top.insert("hidden_size".into(), Value::from(256));
            top.insert("num_attention_heads".into(), Value::from(4));
            for (k, v) in kv {
                top.insert(k.to_string(), v);
            }
            if let Some(m) = map {
                top.insert("ropex_position_map".into(), m);
            }
            if let Some(d) = dca {
                top.insert("dual_chunk_attention_config".into(), d);
            }
            match form {
                0 => {
                    top.insert("rope_parameters".into(), a);
                }
                1 => {
                    top.insert("rope_scaling".into(), a);
                }
                2 => {
                    top.insert("rope_scaling".into(), a);
                    top.insert("rope_parameters".into(), b);
                }
                3 => {
                    top.insert(
                        "layer_types".into(),
                        json!(["sliding_attention", "full_attention"]),
                    );
                    top.insert(
                        "rope_parameters".into(),
                        json!({"full_attention": a, "sliding_attention": b}),
                    );
                }
                _ => {}
            }
            Value::Object(top)
        })
}

/// Everything an accepted config produces must be finite.
fn check_accepted(value: &Value, opts: &ParseOptions) {
    let Ok(entries) = config::from_value(value, opts) else {
        return;
    };
    for rope in entries {
        // An accepted map is valid, and its text form reads back to it.
        if let Some(m) = rope.position_map {
            m.validate()
                .unwrap_or_else(|e| panic!("{value}: accepted map {m:?} invalid: {e}"));
            assert_eq!(
                m.to_string().parse::<PositionMap>().ok(),
                Some(m),
                "{value}"
            );
        }
        let l0 = rope.train_len().unwrap_or(4096);
        for n in [
            None,
            Some(0),
            Some(1),
            Some(7),
            Some(l0),
            Some(l0.saturating_add(1)),
            Some(1 << 20),
            Some(usize::MAX),
        ] {
            let f = match n {
                None => rope.frequencies(),
                Some(n) => rope.frequencies_for_len(n),
            };
            assert_eq!(f.rotary_dim(), rope.config.rotary_dim());
            assert!(
                f.inv_freq().iter().all(|w| w.is_finite() && *w >= 0.0),
                "{value}: inv_freq {:?} at {n:?}",
                f.inv_freq()
            );
            let m = f.attention_factor();
            assert!(m.is_finite() && m > 0.0, "{value}: attention factor {m}");
            for layout in [Layout::Half, Layout::Interleaved] {
                let t = RotaryTable::<f32>::new(&f, 5, layout).expect("table");
                for row in 0..5 {
                    let finite = t.cos_row(row).unwrap().iter().all(|c| c.is_finite())
                        && t.sin_row(row).unwrap().iter().all(|s| s.is_finite());
                    assert!(
                        finite,
                        "{value}: table row {row} not finite (attention factor {m})"
                    );
                }
            }
        }
        // The intended length is never below max_position_embeddings, and at least the
        // extended length `factor x L0` of the schemes that name one.
        let ctx = rope.context_len();
        if let Some(m) = rope.max_position_embeddings {
            assert!(ctx >= Some(m), "{value}: context_len {ctx:?} < {m}");
        }
        if let ropex::Scaling::Yarn(y) = rope.config.scaling()
            && let Some(c) = ctx
        {
            let scaled = (y.factor * y.original_max_position_embeddings as f64).floor();
            if scaled <= 9e15 {
                assert!(c as f64 >= scaled, "{value}: {c} < {scaled}");
            }
        }
        let _ = rope.config.plain_frequencies().explain(
            &rope.frequencies(),
            l0.max(1),
            Some(l0.saturating_mul(2)),
        );
    }
}

fn all_options() -> [ParseOptions; 3] {
    [
        ParseOptions::default(),
        ParseOptions::strict(),
        ParseOptions::transformers_only(false),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        max_shrink_iters: 1024,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_json_never_panics(value in json_value()) {
        for opts in all_options() {
            check_accepted(&value, &opts);
            let _ = config::from_json_str(&value.to_string(), &opts);
        }
    }

    #[test]
    fn random_rope_configs_never_panic_and_stay_finite(value in model_config()) {
        for opts in all_options() {
            check_accepted(&value, &opts);
        }
    }

    #[test]
    fn random_text_never_panics(text in "[\\[\\]{}:,\"a-z_0-9.eE+ -]{0,80}") {
        let _ = config::from_json_str(&text, &ParseOptions::default());
    }
}

#[test]
fn non_json_number_tokens_are_errors() {
    for bad in ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"] {
        let text =
            format!(r#"{{"hidden_size": 64, "num_attention_heads": 2, "rope_theta": {bad}}}"#);
        let r = config::from_json_str(&text, &ParseOptions::default());
        assert!(r.is_err(), "{bad}: {r:?}");
    }
}

#[test]
fn some_generated_configs_are_accepted() {
    // Guard against a generator that only ever produces rejected configs.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = model_config();
    let mut ok = 0;
    for _ in 0..400 {
        let v = strategy.new_tree(&mut runner).unwrap().current();
        if config::from_value(&v, &ParseOptions::default()).is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 20, "only {ok} of 400 random configs accepted");
}
