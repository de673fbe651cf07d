use serde_json::{Value, json};

use super::*;
use crate::Scaling;

fn llama(extra: Value) -> String {
    let mut base = json!({
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
        "max_position_embeddings": 16384
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base.to_string()
}

fn one(json: &str) -> Result<ModelRope> {
    ModelRope::from_json_str(json, None)
}

fn err(json: &str) -> String {
    one(json).expect_err("must fail").to_string()
}

#[test]
fn ropex_ntk_types_and_mixed_b() {
    let r = one(&llama(
        json!({"rope_parameters": {"rope_type": "ntk_mixed", "factor": 8.0}}),
    ))
    .unwrap();
    assert_eq!(r.config.scaling(), &Scaling::ntk_mixed(8.0, 0.625));
    assert!(r.warnings.is_empty());
    let r = one(&llama(json!({"rope_parameters":
        {"rope_type": "ntk_mixed", "factor": 12.0, "mixed_b": 0.75}})))
    .unwrap();
    assert!((r.frequencies().inv_freq()[0] - 0.8959968).abs() < 1e-7);
    for (t, s) in [
        ("ntk_aware", Scaling::NtkAware { factor: 4.0 }),
        ("ntk_old", Scaling::NtkOld { factor: 4.0 }),
        ("ntk_fixed", Scaling::NtkFixed { factor: 4.0 }),
    ] {
        let r = one(&llama(
            json!({"rope_parameters": {"rope_type": t, "factor": 4}}),
        ))
        .unwrap();
        assert_eq!(r.config.scaling(), &s);
        assert_eq!(r.rope_type, t);
    }
    // Strict values for ropex's own types, and no extension types when turned off.
    assert!(
        err(&llama(json!({"rope_parameters":
        {"rope_type": "ntk_mixed", "factor": 4.0, "mixed_b": 1.5}})))
        .contains("rope_parameters.b")
    );
    assert!(
        err(&llama(
            json!({"rope_parameters": {"rope_type": "ntk_old", "factor": 0.5}})
        ))
        .contains("factor")
    );
    let e = ModelRope::from_json_str_with(
        &llama(json!({"rope_parameters": {"rope_type": "ntk_old", "factor": 2}})),
        None,
        &ParseOptions::transformers_only(false),
    )
    .unwrap_err();
    assert!(matches!(e, RopeError::UnknownRopeType { .. }), "{e}");
}

#[test]
fn position_maps_top_level_and_per_dict() {
    let r = one(&llama(json!({
        "rope_parameters": {"rope_type": "default"},
        "ropex_position_map": {"type": "rerope", "window": 512}
    })))
    .unwrap();
    assert_eq!(r.position_map, Some(PositionMap::ReRope { window: 512 }));
    let r = one(&llama(json!({
        "rope_parameters": {"rope_type": "default",
            "ropex_position_map": {"type": "leaky_rerope", "window": 512, "leak": 16}},
        "ropex_position_map": {"type": "rerope", "window": 64}
    })))
    .unwrap();
    assert_eq!(
        r.position_map,
        Some(PositionMap::LeakyReRope {
            window: 512,
            leak: 16.0
        })
    );
    assert!(r.warnings.is_empty());
    for bad in [
        json!({"type": "rerope"}),
        json!({"type": "rerope", "window": 0}),
        json!({"type": "rerope", "window": -3}),
        json!({"type": "leaky_rerope", "window": 8, "leak": 0}),
        json!({"type": "leaky_rerope", "window": 8, "leak": "16"}),
        json!({"type": "spiral"}),
        json!("rerope:0"),
        json!("spiral:3"),
        json!(512),
        json!({"window": 8}),
    ] {
        let e = err(&llama(json!({"ropex_position_map": bad.clone()})));
        assert!(e.contains("ropex_position_map"), "{bad}: {e}");
    }
    // Unknown keys in the map are warnings; with extensions off the key is ignored at
    // the top level and unrecognized inside a rope dict.
    let r = one(&llama(
        json!({"ropex_position_map": {"type": "rope", "window": 3}}),
    ))
    .unwrap();
    assert_eq!(r.warnings.len(), 1);
    let off = ParseOptions::transformers_only(false);
    let r = ModelRope::from_json_str_with(
        &llama(json!({"rope_parameters": {"rope_type": "default",
            "ropex_position_map": {"type": "rope"}}})),
        None,
        &off,
    )
    .unwrap();
    assert_eq!(r.position_map, None);
    assert_eq!(r.warnings.len(), 1);
}

/// The map a config gives, with default options and in strict mode (both must agree
/// and warn about nothing).
fn map_of(map: Value) -> PositionMap {
    let cfg = llama(json!({ "ropex_position_map": map }));
    let r = one(&cfg).unwrap();
    assert!(r.warnings.is_empty(), "{map}: {:?}", r.warnings);
    let strict = ModelRope::from_json_str_with(&cfg, None, &ParseOptions::strict()).unwrap();
    assert_eq!(strict.position_map, r.position_map);
    r.position_map.expect("a map")
}

#[test]
fn every_map_in_object_and_string_form_equals_its_constructor() {
    let cases = [
        (json!({"type": "rope"}), "rope", PositionMap::Rope),
        (
            json!({"type": "rerope", "window": 512}),
            "rerope:512",
            PositionMap::rerope(512).unwrap(),
        ),
        (
            json!({"type": "leaky_rerope", "window": 512, "leak": 0.5}),
            "leaky:512:0.5",
            PositionMap::leaky_rerope(512, 0.5).unwrap(),
        ),
        (
            json!({"type": "interpolated", "factor": 4}),
            "interp:4",
            PositionMap::interpolated(4.0).unwrap(),
        ),
        (
            json!({"type": "self_extend", "group_size": 8, "window": 1024}),
            "self-extend:8:1024",
            PositionMap::self_extend(8, 1024).unwrap(),
        ),
        (
            json!({"type": "self_extend", "group_size": 4, "window": 512.0, "scale_base": 4096}),
            "self-extend:4:512:4096",
            PositionMap::self_extend_scaled(4, 512, 4096.0).unwrap(),
        ),
        (
            json!({"type": "self_extend", "group_size": 4, "window": 512, "scale_base": null}),
            "self_extend:4:512",
            PositionMap::self_extend(4, 512).unwrap(),
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": 3072, "local_window": 512}),
            "dca:3072:512",
            PositionMap::dca(3072, 512).unwrap(),
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": 3072, "local_size": 512}),
            "dca:3072:512",
            PositionMap::dca(3072, 512).unwrap(),
        ),
        (
            json!({"type": "streaming", "sinks": 4, "window": 1024}),
            "streaming:4:1024",
            PositionMap::streaming(4, 1024).unwrap(),
        ),
        (
            json!({"type": "streaming", "sinks": 0, "window": 1}),
            "streaming:0:1",
            PositionMap::streaming(0, 1).unwrap(),
        ),
    ];
    for (object, text, want) in cases {
        assert_eq!(map_of(object.clone()), want, "{object}");
        assert_eq!(map_of(json!(text)), want, "{text}");
        // The map's own text form reads back to the same map.
        assert_eq!(map_of(json!(want.to_string())), want, "{want}");
    }
    // Inside a rope dict (per layer type) it wins over the top level, for the new maps too.
    let r = one(&llama(json!({
        "rope_parameters": {"rope_type": "default",
            "ropex_position_map": "streaming:4:64"},
        "ropex_position_map": {"type": "self_extend", "group_size": 2, "window": 8}
    })))
    .unwrap();
    assert_eq!(r.position_map, Some(PositionMap::streaming(4, 64).unwrap()));
}

/// A map config's error: its message, which must be a typed parameter or missing-key
/// error.
fn map_err(map: Value) -> String {
    let e = one(&llama(json!({ "ropex_position_map": map.clone() }))).expect_err("must fail");
    assert!(
        matches!(
            e,
            RopeError::InvalidParameter { .. } | RopeError::MissingKey { .. }
        ),
        "{map}: {e:?}"
    );
    e.to_string()
}

#[test]
fn bad_map_parameters_are_typed_errors_naming_the_key() {
    for (map, key) in [
        (
            json!({"type": "self_extend", "group_size": 0, "window": 8}),
            "ropex_position_map.group_size",
        ),
        (
            json!({"type": "self_extend", "group_size": 2, "window": 0}),
            "ropex_position_map.window",
        ),
        (
            json!({"type": "self_extend", "group_size": 2, "window": 8, "scale_base": 1}),
            "ropex_position_map.scale_base",
        ),
        (
            json!({"type": "self_extend", "group_size": 2, "window": 8, "scale_base": "e"}),
            "ropex_position_map.scale_base",
        ),
        (
            json!({"type": "self_extend", "group_size": 2.5, "window": 8}),
            "ropex_position_map.group_size",
        ),
        (json!({"type": "self_extend", "window": 8}), "group_size"),
        (json!({"type": "self_extend", "group_size": 2}), "window"),
        (
            json!({"type": "dual_chunk", "chunk_size": 0, "local_window": 0}),
            "ropex_position_map.chunk_size",
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": 8, "local_window": 8}),
            "ropex_position_map.local_window",
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": 8, "local_size": 9}),
            "ropex_position_map.local_size",
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": 8, "local_size": 2, "local_window": 2}),
            "ropex_position_map.local_size",
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": 8}),
            "local_window",
        ),
        (
            json!({"type": "dual_chunk", "chunk_size": -8, "local_window": 2}),
            "ropex_position_map.chunk_size",
        ),
        (
            json!({"type": "streaming", "sinks": 4, "window": 0}),
            "ropex_position_map.window",
        ),
        (
            json!({"type": "streaming", "sinks": true, "window": 8}),
            "ropex_position_map.sinks",
        ),
        (
            json!({"type": "streaming", "sinks": 18446744073709551615u64, "window": 8}),
            "ropex_position_map.sinks",
        ),
        (json!({"type": "streaming", "window": 8}), "sinks"),
        (
            json!({"type": "interpolated", "factor": 0}),
            "ropex_position_map.factor",
        ),
        (
            json!({"type": "rerope", "window": 0}),
            "ropex_position_map.window",
        ),
        (
            json!({"type": "leaky_rerope", "window": 4, "leak": -1}),
            "ropex_position_map.leak",
        ),
        (
            json!({"type": "self-extend", "group_size": 2, "window": 8}),
            "ropex_position_map.type",
        ),
        (json!("self-extend:0:8"), "group"),
        (json!("dca:8:8"), "local_window"),
        (json!("streaming:4:0"), "window"),
        (json!("self-extend:8"), "ropex_position_map"),
    ] {
        let e = map_err(map.clone());
        assert!(e.contains(key), "{map}: {e}");
        assert!(e.contains("ropex_position_map"), "{map}: {e}");
    }
    // The type error lists every type.
    let e = map_err(json!({"type": "dca"}));
    for t in [
        "rope",
        "rerope",
        "leaky_rerope",
        "interpolated",
        "self_extend",
        "dual_chunk",
        "streaming",
    ] {
        assert!(e.contains(t), "{e}");
    }
}

#[test]
fn unknown_map_keys_warn_normally_and_fail_in_strict_mode() {
    let cfg = llama(json!({"ropex_position_map":
        {"type": "self_extend", "group_size": 8, "window": 1024, "group_size_2": 512}}));
    let r = one(&cfg).unwrap();
    assert_eq!(
        r.position_map,
        Some(PositionMap::self_extend(8, 1024).unwrap())
    );
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(
        r.warnings[0].contains("ropex_position_map.group_size_2"),
        "{:?}",
        r.warnings
    );
    assert!(r.warnings[0].contains("scale_base"), "{:?}", r.warnings);
    let e = ModelRope::from_json_str_with(&cfg, None, &ParseOptions::strict()).unwrap_err();
    assert!(
        e.to_string().contains("ropex_position_map.group_size_2"),
        "{e}"
    );
    // A dual_chunk map's window key is DCA's, not ReRoPE's.
    let cfg = llama(json!({"ropex_position_map":
        {"type": "dual_chunk", "chunk_size": 64, "local_window": 8, "window": 8}}));
    assert_eq!(one(&cfg).unwrap().warnings.len(), 1);
    assert!(ModelRope::from_json_str_with(&cfg, None, &ParseOptions::strict()).is_err());
}

/// Qwen2.5-7B-Instruct-1M's config.json as published (the keys ropex reads, and the
/// `dual_chunk_attention_config` block verbatim).
fn qwen_1m(extra: Value) -> String {
    let mut base = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
        "num_hidden_layers": 28, "max_window_layers": 28,
        "max_position_embeddings": 1010000, "rope_theta": 10000000.0,
        "sliding_window": 32768, "use_sliding_window": false,
        "dual_chunk_attention_config": {
            "chunk_size": 262144, "local_size": 8192,
            "original_max_position_embeddings": 262144
        }
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base.to_string()
}

#[test]
fn vllm_dual_chunk_attention_config_is_a_dca_map() {
    for opts in [ParseOptions::default(), ParseOptions::strict()] {
        let r = ModelRope::from_json_str_with(&qwen_1m(json!({})), None, &opts).unwrap();
        assert_eq!(
            r.position_map,
            Some(PositionMap::dca(262_144, 8192).unwrap())
        );
        assert_eq!(r.original_max_position_embeddings, Some(262_144));
        assert_eq!(r.train_len(), Some(262_144));
        assert_eq!(r.max_position_embeddings, Some(1_010_000));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.config.rotary_dim(), 128);
    }
    // vLLM's sparse-attention keys are accepted and noted as ignored; an unknown key
    // warns (strict: fails); original_max_position_embeddings = 0 is vLLM's "unset".
    let cfg = qwen_1m(json!({"dual_chunk_attention_config": {
        "chunk_size": 64, "local_size": 8, "original_max_position_embeddings": 0,
        "sparse_attention_enabled": true, "sparse_attention_threshold": 32768,
        "sparse_attention_config": {"0": {}}}}));
    let r = one(&cfg).unwrap();
    assert_eq!(r.position_map, Some(PositionMap::dca(64, 8).unwrap()));
    assert_eq!(r.original_max_position_embeddings, None);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("sparse_attention_enabled")),
        "{:?}",
        r.notes
    );
    let cfg = qwen_1m(json!({"dual_chunk_attention_config":
        {"chunk_size": 64, "local_size": 8, "chunk_len": 56}}));
    assert_eq!(one(&cfg).unwrap().warnings.len(), 1);
    let e = ModelRope::from_json_str_with(&cfg, None, &ParseOptions::strict()).unwrap_err();
    assert!(
        e.to_string()
            .contains("dual_chunk_attention_config.chunk_len"),
        "{e}"
    );
    // A top-level original_max_position_embeddings wins over the block's.
    let r = one(&qwen_1m(json!({"original_max_position_embeddings": 32768}))).unwrap();
    assert_eq!(r.original_max_position_embeddings, Some(32768));
    // With extensions off the block is ignored, as transformers does, and noted.
    let r = ModelRope::from_json_str_with(
        &qwen_1m(json!({})),
        None,
        &ParseOptions::transformers_only(true),
    )
    .unwrap();
    assert_eq!(r.position_map, None);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("dual_chunk_attention_config"))
    );
}

#[test]
fn bad_dual_chunk_blocks_are_typed_errors_naming_the_key() {
    for (block, key) in [
        (json!({"chunk_size": 64}), "local_size"),
        (json!({"local_size": 8}), "chunk_size"),
        (
            json!({"chunk_size": 0, "local_size": 0}),
            "dual_chunk_attention_config.chunk_size",
        ),
        (
            json!({"chunk_size": 64, "local_size": 64}),
            "dual_chunk_attention_config.local_size",
        ),
        (
            json!({"chunk_size": "64", "local_size": 8}),
            "dual_chunk_attention_config.chunk_size",
        ),
        (
            json!({"chunk_size": 64, "local_size": 8, "original_max_position_embeddings": -1}),
            "dual_chunk_attention_config.original_max_position_embeddings",
        ),
        (json!([64, 8]), "dual_chunk_attention_config"),
    ] {
        let e = one(&qwen_1m(
            json!({ "dual_chunk_attention_config": block.clone() }),
        ))
        .expect_err("must fail");
        assert!(
            matches!(
                e,
                RopeError::InvalidParameter { .. } | RopeError::MissingKey { .. }
            ),
            "{block}: {e:?}"
        );
        assert!(e.to_string().contains(key), "{block}: {e}");
    }
    // null is absent, as everywhere in config.json.
    let r = one(&qwen_1m(json!({"dual_chunk_attention_config": null}))).unwrap();
    assert_eq!(r.position_map, None);
}

#[test]
fn ropex_position_map_takes_precedence_over_the_dca_block() {
    let r = one(&qwen_1m(
        json!({"ropex_position_map": "self-extend:8:1024"}),
    ))
    .unwrap();
    assert_eq!(
        r.position_map,
        Some(PositionMap::self_extend(8, 1024).unwrap())
    );
    assert!(r.warnings.is_empty());
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("takes precedence") && n.contains("dca:262144:8192")),
        "{:?}",
        r.notes
    );
    // The block's length still names the training length, and a broken block still fails.
    assert_eq!(r.original_max_position_embeddings, Some(262_144));
    let e = one(&qwen_1m(json!({"ropex_position_map": "rope",
        "dual_chunk_attention_config": {"chunk_size": 8, "local_size": 8}})))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("dual_chunk_attention_config.local_size"),
        "{e}"
    );
}

#[test]
fn bad_values_are_typed_errors_naming_the_key() {
    let cases = [
        (
            json!({"rope_parameters": {"rope_type": "linear", "factor": "4"}}),
            "factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "linear", "factor": null}}),
            "factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "linear", "factor": true}}),
            "factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "linear", "factor": -2.0}}),
            "factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "linear", "factor": 0}}),
            "factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "linear", "factor": [2]}}),
            "factor",
        ),
        (json!({"rope_theta": "10000"}), "rope_theta"),
        (json!({"rope_theta": null}), "rope_theta"),
        (json!({"rope_theta": 1.0}), "rope_theta"),
        (json!({"rope_theta": -5}), "rope_theta"),
        (json!({"rope_theta": f64::MAX}), "none"),
        (json!({"head_dim": 4096.0}), "head_dim"),
        (json!({"head_dim": 200000}), "head_dim"),
        (json!({"head_dim": 0, "hidden_size": 0}), "head_dim"),
        (
            json!({"max_position_embeddings": "4096"}),
            "max_position_embeddings",
        ),
        (
            json!({"max_position_embeddings": -1}),
            "max_position_embeddings",
        ),
        (json!({"hidden_size": 4001}), "hidden_size"),
        (json!({"hidden_size": 4000}), "even rotary dimension"),
        (json!({"num_attention_heads": 0}), "hidden_size"),
        (
            json!({"partial_rotary_factor": 1.5,
                "rope_parameters": {"rope_type": "linear", "factor": 2.0}}),
            "partial_rotary_factor",
        ),
        (
            json!({"partial_rotary_factor": 0.0,
                "rope_parameters": {"rope_type": "linear", "factor": 2.0}}),
            "partial_rotary_factor",
        ),
        (
            json!({"partial_rotary_factor": "half",
                "rope_parameters": {"rope_type": "linear", "factor": 2.0}}),
            "partial_rotary_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 0}}),
            "original_max_position_embeddings",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 4096.5}}),
            "original_max_position_embeddings",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                "beta_fast": "fast"}}),
            "beta_fast",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                "beta_fast": -1}}),
            "beta_fast",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                "attention_factor": 0.0}}),
            "attention_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                "mscale": 1.0, "mscale_all_dim": -10.0}}),
            "attention factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "longrope", "factor": 4.0,
                "short_factor": [1.0, 2.0], "long_factor": [1.0, 2.0]}}),
            "short_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "longrope", "factor": 4.0,
                "short_factor": "abc", "long_factor": [1.0]}}),
            "short_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "longrope", "factor": 4.0,
                "short_factor": [1.0], "long_factor": [-1.0]}}),
            "long_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "longrope", "factor": 4.0,
                "short_factor": [1.0], "long_factor": [null]}}),
            "long_factor[0]",
        ),
        (
            json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}}),
            "low_freq_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": null, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}}),
            "low_freq_factor",
        ),
        (
            json!({"rope_parameters": {"rope_type": "proportional",
                "partial_rotary_factor": 2.0}}),
            "partial_rotary_factor",
        ),
        (json!({"rope_parameters": [1, 2]}), "rope_parameters"),
        (json!({"rope_scaling": "linear"}), "rope_scaling"),
        (json!({"rope_parameters": {"rope_type": 7}}), "7"),
        (json!({"rope_parameters": {"rope_type": null}}), "null"),
        (json!({"rope_parameters": {"rope_type": "axial"}}), "axial"),
        (json!({"model_type": 3}), "model_type"),
        (json!({"layer_types": "full_attention"}), "layer_types"),
    ];
    for (extra, key) in cases {
        match one(&llama(extra.clone())) {
            Ok(r) if key == "none" => assert!(r.frequencies().inv_freq()[1].is_finite()),
            Ok(r) => panic!("{extra} accepted: {:?}", r.config),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(key), "{extra}: '{msg}' does not name {key}");
                assert!(!msg.contains('\n'));
            }
        }
    }
    // Missing keys are MissingKey errors.
    let e = one(&llama(json!({"rope_scaling": {"type": "linear"}}))).unwrap_err();
    assert!(
        matches!(e, RopeError::MissingKey { ref key, .. } if key == "factor"),
        "{e}"
    );
    // Not JSON, not an object.
    assert!(matches!(one("{"), Err(RopeError::Config(_))));
    assert!(matches!(one("[1]"), Err(RopeError::Config(_))));
    assert!(matches!(
        one("{\"rope_theta\": NaN}"),
        Err(RopeError::Config(_))
    ));
    // Generic model without dims.
    let e = one(r#"{"rope_theta": 10000}"#).unwrap_err();
    assert!(matches!(e, RopeError::MissingKey { .. }), "{e}");
}

#[test]
fn head_dim_null_follows_each_rope_types_read() {
    // Qwen2 has no head_dim field: null stays None.
    let qwen = |rope: Value| {
        json!({"model_type": "qwen2", "hidden_size": 2560, "num_attention_heads": 32,
               "head_dim": null, "rope_parameters": rope})
        .to_string()
    };
    let r = one(&qwen(json!({"rope_type": "linear", "factor": 2.0}))).unwrap();
    assert_eq!(r.config.head_dim(), 80);
    let e = err(&qwen(json!({"rope_type": "dynamic", "factor": 2.0})));
    assert!(e.contains("head_dim") && e.contains("null"), "{e}");
    // Llama fills a null head_dim in __post_init__.
    let r = one(&llama(json!({"head_dim": null,
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})))
    .unwrap();
    assert_eq!(r.config.head_dim(), 128);
    // DeepSeek-V3 uses qk_rope_head_dim, unless config.json has a head_dim key (set after
    // DeepseekV3Config.__post_init__, so it wins).
    let r = one(&json!({"model_type": "deepseek_v3", "qk_rope_head_dim": 32,
        "rope_theta": 10000})
    .to_string())
    .unwrap();
    assert_eq!(r.config.head_dim(), 32);
    let r = one(&json!({"model_type": "deepseek_v3", "head_dim": 192,
        "qk_rope_head_dim": 32, "rope_theta": 10000})
    .to_string())
    .unwrap();
    assert_eq!(r.config.head_dim(), 192);
}

#[test]
fn per_layer_form_and_layer_selection() {
    let json = json!({
        "model_type": "gemma3_text", "hidden_size": 1024, "num_attention_heads": 8,
        "head_dim": 128, "num_hidden_layers": 6,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6,
                "ropex_position_map": {"type": "rerope", "window": 256}},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
        }
    })
    .to_string();
    let all = from_json_str(&json, &ParseOptions::default()).unwrap();
    let names: Vec<_> = all.iter().map(|r| r.layer_type.clone().unwrap()).collect();
    assert_eq!(names, ["full_attention", "sliding_attention"]);
    assert_eq!(
        all[0].position_map,
        Some(PositionMap::ReRope { window: 256 })
    );
    assert_eq!(all[1].position_map, None);
    let full = ModelRope::from_json_str(&json, Some("full_attention")).unwrap();
    assert_eq!(full.config.scaling(), &Scaling::linear(8.0));
    assert_eq!(full.config.base(), 1e6);
    let e = ModelRope::from_json_str(&json, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("full_attention, sliding_attention"), "{e}");
    let e = ModelRope::from_json_str(&json, Some("chunked"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be one of"), "{e}");
    let flat = llama(json!({}));
    assert!(ModelRope::from_json_str(&flat, Some("full_attention")).is_err());
    // A bad sliding layer fails the whole config, as in transformers.
    let bad = json.replace("\"rope_type\":\"default\"", "\"rope_type\":\"linear\"");
    assert!(ModelRope::from_json_str(&bad, Some("full_attention")).is_err());
}

#[test]
fn strict_mode_and_warnings() {
    let json = llama(json!({"rope_parameters": {"rope_type": "linear", "factor": 0.5}}));
    let r = one(&json).unwrap();
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].contains("rope_parameters.factor = 0.5"));
    assert!((r.frequencies().inv_freq()[0] - 2.0).abs() < 1e-15);
    let e = ModelRope::from_json_str_with(&json, None, &ParseOptions::strict()).unwrap_err();
    assert!(
        matches!(e, RopeError::InvalidParameter { ref field, .. } if field == "rope_parameters.factor")
    );
    // A non-boolean truncate is a ropex warning (truthiness, as in transformers).
    let json = llama(
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 4096, "truncate": "false"}}),
    );
    let r = one(&json).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("truncate")));
    assert!(matches!(r.config.scaling(), Scaling::Yarn(y) if y.truncate));
}

#[test]
fn lengths_and_train_len() {
    let r = one(&llama(
        json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
    ))
    .unwrap();
    assert_eq!(r.max_position_embeddings, Some(16384));
    assert_eq!(r.original_max_position_embeddings, None);
    assert_eq!(r.train_len(), Some(16384));
    let r = one(&llama(
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 4096}}),
    ))
    .unwrap();
    assert_eq!(r.train_len(), Some(4096));
    // gpt-oss fills a missing rope dict with its YaRN block.
    let r = one(&json!({"model_type": "gpt_oss"}).to_string()).unwrap();
    assert_eq!(r.rope_type, "yarn");
    assert!(matches!(r.config.scaling(), Scaling::Yarn(y) if !y.truncate && y.factor == 32.0));
    assert_eq!(r.config.base(), 150_000.0);
    // Unknown model types get generic rules and a note.
    let r = one(&json!({"model_type": "mistral", "hidden_size": 4096,
        "num_attention_heads": 32, "rope_theta": 1e6})
    .to_string())
    .unwrap();
    assert!(r.notes[0].contains("mistral"));
    assert_eq!(r.config.rotary_dim(), 128);
}

#[test]
fn from_path_reports_io_and_json_errors() {
    let e = from_path("/nonexistent/config.json", &ParseOptions::default()).unwrap_err();
    assert!(matches!(e, RopeError::Io { .. }), "{e}");
    let dir = std::env::temp_dir().join(format!("ropex-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.json");
    std::fs::write(&path, "{\"rope_theta\": }").unwrap();
    let e = from_path(&path, &ParseOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.json") && e.contains("not valid JSON"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn context_len_of_the_committed_model_configs() {
    // (file, max_position_embeddings, context_len): the larger of max_position_embeddings
    // and factor x original_max_position_embeddings.
    let cases = [
        ("deepseek_v3.json", 163_840, 163_840), // 40 x 4096
        ("gpt_oss_20b.json", 131_072, 131_072), // 32 x 4096
        ("llama3_1_8b.json", 131_072, 131_072), // 8 x 8192 = 65536 < max_pos
        ("phi3_mini_128k_instruct.json", 131_072, 131_072), // derived 131072 / 4096
        ("qwen2_5_7b_instruct_yarn.json", 32_768, 131_072), // 4 x 32768
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/configs");
    for (file, max_pos, want) in cases {
        let r = ModelRope::from_path(dir.join(file), None).unwrap();
        assert_eq!(r.max_position_embeddings, Some(max_pos), "{file}");
        assert_eq!(r.context_len(), Some(want), "{file}");
    }
    // No original length named: max_position_embeddings.
    let r = one(&llama(
        json!({"rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    ))
    .unwrap();
    assert_eq!(r.context_len(), Some(16384));
    let r = one(&llama(
        json!({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}),
    ))
    .unwrap();
    assert_eq!(r.context_len(), Some(16384));
    // A non-integral product is floored.
    let r = one(&llama(
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.5,
        "original_max_position_embeddings": 8193}}),
    ))
    .unwrap();
    assert_eq!(r.context_len(), Some(20_482));
}

#[test]
fn llama3_without_original_uses_max_position_embeddings_and_says_so() {
    let band = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "rope_theta": 500000.0});
    let r = one(&llama(json!({"rope_parameters": band}))).unwrap();
    // transformers' standardize_rope_params fills in max_position_embeddings (16384).
    let mut explicit = band.clone();
    explicit["original_max_position_embeddings"] = json!(16384);
    let e = one(&llama(json!({"rope_parameters": explicit}))).unwrap();
    assert_eq!(r.config, e.config);
    assert_eq!(r.original_max_position_embeddings, Some(16384));
    assert!(matches!(r.config.scaling(),
        Scaling::Llama3(l) if l.original_max_position_embeddings == 16384));
    // One warning, about the missing key, not about a value the user never wrote.
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("original_max_position_embeddings = missing"));
    assert!(!r.warnings[0].contains("must be less than"));
    // The explicit config gets transformers' own warning (16384 is not below 16384).
    assert!(e.warnings[0].contains("must be less than max_position_embeddings"));
    let strict = ModelRope::from_json_str_with(
        &llama(json!({"rope_parameters": band})),
        None,
        &ParseOptions::strict(),
    );
    assert!(strict.is_err());
}
