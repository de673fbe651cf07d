//! Parity with Hugging Face transformers (`tests/data/hf_golden.json`,
//! `tests/data/hf_models.json`, written by `tools/hf_golden.py` with transformers itself).
//!
//! How values are compared: transformers computes `inv_freq` in f32 (the exponent
//! `arange(0, dim, 2) / dim`, `base ** exponent`, `1 / x` and the YaRN/llama3 blends are
//! all f32 operations) and the golden files hold those f32 numbers exactly. ropex
//! computes in f64. Each ropex value `r` is compared with the f32 value `h` by relative
//! error `|r - h| / |h| <= 1e-6`; an exact zero (proportional RoPE's non-rotating pairs)
//! must be exactly zero. No f32 emulation is used. The f32 results carry a few ulps
//! (~6e-8 each) of rounding, amplified by `ln(base) * 2j/d` in the power (observed: up to
//! ~3e-7) and, inside a blended band (YaRN's ramp, llama3's smooth band), by the
//! sensitivity of the blend to its weight (up to `s - 1` for YaRN): every golden case stays
//! below 1e-6 (largest 4.4e-7, printed by the test), but random configs can reach ~2.4e-6.
//! `transformers_f32_blend_error_is_explained_not_hidden` pins two such values and shows
//! that ropex equals the exact formula while an f32 emulation of transformers' operation
//! order reproduces transformers to a few ulps: the gap is transformers' f32 error, so
//! ropex keeps f64 rather than emulating it. The attention factor is a Python float (f64)
//! in transformers and is compared the same way.
//!
//! Cases:
//! - every `cases` entry (and every real model in hf_models.json) must parse with the
//!   default options and match; with strict options it must fail exactly when
//!   transformers logged a warning for it;
//! - every `errors` entry must fail; the ones that use a ropex rope type (`ntk_mixed`)
//!   fail only with `ParseOptions::transformers_only`, and are accepted by default;
//! - every `warnings` entry must parse normally (and match transformers when transformers
//!   could compute it) and fail in strict mode.

use std::path::PathBuf;

use ropex::Frequencies;
use ropex::config::{ModelRope, ParseOptions};
use serde_json::Value;

const TOL: f64 = 1e-6;

/// Cases whose rope type is one of ropex's own (`ntk_mixed`): transformers rejects them,
/// ropex reads them unless extensions are off.
const ROPEX_EXTENSION_CASES: [&str; 2] =
    ["unknown_rope_type", "unknown_rope_type_config_only_warns"];

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(data(name)).expect("golden file");
    serde_json::from_str(&text).expect("golden JSON")
}

fn parse(case: &Value, opts: &ParseOptions) -> ropex::Result<ModelRope> {
    let json = serde_json::to_string(&case["config"]).unwrap();
    ModelRope::from_json_str_with(&json, case["layer_type"].as_str(), opts)
}

fn frequencies(rope: &ModelRope, case: &Value) -> Frequencies {
    match case["seq_len"].as_u64() {
        Some(n) => rope.frequencies_for_len(n as usize),
        None => rope.frequencies(),
    }
}

/// Largest relative error of ropex against transformers for one case (panics on a
/// length mismatch or a non-zero where transformers has an exact zero).
fn max_rel_error(name: &str, got: &Frequencies, case: &Value) -> (f64, f64) {
    let want: Vec<f64> = case["inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(
        got.inv_freq().len(),
        want.len(),
        "{name}: number of frequencies"
    );
    let mut worst: f64 = 0.0;
    for (j, (&g, &w)) in got.inv_freq().iter().zip(&want).enumerate() {
        if w == 0.0 {
            assert_eq!(g, 0.0, "{name}: inv_freq[{j}] must be exactly 0");
        } else {
            worst = worst.max(((g - w) / w).abs());
        }
    }
    let att = case["attention_factor"].as_f64().unwrap();
    let att_err = ((got.attention_factor() - att) / att).abs();
    (worst, att_err)
}

fn check_values(file: &str, failures: &mut Vec<String>, stats: &mut Vec<(String, f64)>) {
    let golden = load(file);
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let rope = match parse(case, &ParseOptions::default()) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{file}:{name}: ropex error: {e}"));
                continue;
            }
        };
        let got = frequencies(&rope, case);
        let (inv_err, att_err) = max_rel_error(name, &got, case);
        stats.push((name.to_string(), inv_err));
        if inv_err > TOL || att_err > TOL {
            failures.push(format!(
                "{file}:{name}: inv_freq rel err {inv_err:.3e}, attention factor rel err \
                 {att_err:.3e}"
            ));
        }
        if rope.rope_type != case["rope_type"].as_str().unwrap() {
            failures.push(format!(
                "{file}:{name}: rope_type {} != {}",
                rope.rope_type, case["rope_type"]
            ));
        }
        // Strict mode fails exactly where transformers warned.
        let hf_warned = !case["warnings"].as_array().unwrap().is_empty();
        let strict = parse(case, &ParseOptions::strict());
        if strict.is_ok() == hf_warned {
            failures.push(format!(
                "{file}:{name}: transformers warned: {hf_warned}, strict parse: {:?}",
                strict.map(|r| r.warnings)
            ));
        }
        // Without warnings from transformers, ropex has none either.
        if !hf_warned && !rope.warnings.is_empty() {
            failures.push(format!(
                "{file}:{name}: unexpected ropex warnings {:?}",
                rope.warnings
            ));
        }
    }
}

#[test]
fn golden_cases_match_transformers_to_1e6_relative() {
    let mut failures = Vec::new();
    let mut stats = Vec::new();
    check_values("hf_golden.json", &mut failures, &mut stats);
    check_values("hf_models.json", &mut failures, &mut stats);
    stats.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!(
        "{} golden cases; largest inv_freq relative errors: {:?}",
        stats.len(),
        &stats[..stats.len().min(5)]
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(stats.len() >= 60);
}

#[test]
fn transformers_errors_are_ropex_errors() {
    let golden = load("hf_golden.json");
    let mut failures = Vec::new();
    for case in golden["errors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for opts in [
            ParseOptions::transformers_only(false),
            ParseOptions::transformers_only(true),
        ] {
            if let Ok(r) = parse(case, &opts) {
                failures.push(format!("{name}: accepted ({opts:?}): {:?}", r.config));
            }
        }
        let default = parse(case, &ParseOptions::default());
        let is_ext = ROPEX_EXTENSION_CASES.contains(&name);
        match (is_ext, &default) {
            (false, Ok(r)) => failures.push(format!("{name}: accepted: {:?}", r.config)),
            (true, Err(e)) => failures.push(format!("{name}: ropex type rejected: {e}")),
            _ => {}
        }
        if let Err(e) = &default {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{name}: multi-line error {msg}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn transformers_warnings_are_ok_normally_and_errors_in_strict_mode() {
    let golden = load("hf_golden.json");
    let mut failures = Vec::new();
    for case in golden["warnings"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let is_ext = ROPEX_EXTENSION_CASES.contains(&name);
        match parse(case, &ParseOptions::default()) {
            Err(e) => failures.push(format!("{name}: rejected: {e}")),
            Ok(rope) => {
                if !is_ext && rope.warnings.is_empty() {
                    failures.push(format!("{name}: no warning collected"));
                }
                if case.get("inv_freq").is_some() {
                    let (inv_err, att_err) = max_rel_error(name, &frequencies(&rope, case), case);
                    if inv_err > TOL || att_err > TOL {
                        failures.push(format!(
                            "{name}: inv_freq rel err {inv_err:.3e}, attention rel err {att_err:.3e}"
                        ));
                    }
                }
            }
        }
        if parse(case, &ParseOptions::transformers_only(true)).is_ok() {
            failures.push(format!("{name}: accepted in strict transformers-only mode"));
        }
        let strict = parse(case, &ParseOptions::strict());
        if strict.is_ok() != is_ext {
            failures.push(format!("{name}: strict (with extensions) gave {strict:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn model_config_files_equal_their_golden_configs() {
    let models = load("hf_models.json");
    for case in models["cases"].as_array().unwrap() {
        let file = case["config_file"].as_str().unwrap();
        let from_file = ModelRope::from_path(data(file), None).unwrap();
        let inline = parse(case, &ParseOptions::default()).unwrap();
        assert_eq!(from_file.config, inline.config, "{file}");
    }
}

/// Why 1e-6 relative is not a law: in a blended band transformers' f32 rounding of the
/// blend weight is amplified. For YaRN, `d ln(inv_j) / d ramp_j ~ -(s - 1)` near the
/// interpolated end of the ramp, so half an f32 ulp of the ramp (~3e-8) becomes ~2.4e-6
/// at `s = 40`; llama3's smooth factor behaves alike. No golden case lands there (the
/// largest gap is printed by `golden_cases_match_transformers_to_1e6_relative`), but
/// random configs do (found by a differential run against transformers 5.24). ropex keeps
/// f64: its value is the exact formula, and emulating transformers' f32 operation order
/// reproduces transformers' number to a few f32 ulps. The two transformers values below
/// were captured from transformers 5.24 / torch 2.x on CPU.
#[test]
fn transformers_f32_blend_error_is_explained_not_hidden() {
    // gpt-oss-like YaRN, factor 40, truncate false, d = 128, base 1e4, L0 = 4096; pair 45.
    let hf_yarn_45 = 4.017399260192178e-05_f64;
    let json = r#"{"model_type": "gpt_oss", "num_attention_heads": 16, "hidden_size": 512,
        "head_dim": 128, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "truncate": false}}"#;
    let rope = ModelRope::from_json_str(json, None).unwrap();
    let got = rope.frequencies().inv_freq()[45];
    let (d, base, s, l0) = (128.0f64, 10_000.0f64, 40.0f64, 4096.0f64);
    let corr = |r: f64| d * (l0 / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let (low, high) = (corr(32.0).max(0.0), corr(1.0).min(d - 1.0));
    let theta = base.powf(-90.0 / d);
    let ramp = ((45.0 - low) / (high - low)).clamp(0.0, 1.0);
    let exact = theta / s * ramp + theta * (1.0 - ramp);
    assert!(
        ((got - exact) / exact).abs() < 1e-14,
        "ropex is the f64 formula"
    );
    let rel = ((got - hf_yarn_45) / hf_yarn_45).abs();
    assert!(rel > 1e-6 && rel < 3e-6, "{rel}");
    // transformers' f32 operation order.
    let pos = (base as f32).powf(90.0f32 / 128.0f32);
    let (extrap, interp) = (1.0f32 / pos, 1.0f32 / (s as f32 * pos));
    let ramp32 = ((45.0f32 - low as f32) / ((high - low) as f32)).clamp(0.0, 1.0);
    let ext = 1.0f32 - ramp32;
    let emulated = interp * (1.0 - ext) + extrap * ext;
    let ulps = ((emulated - hf_yarn_45 as f32) / (hf_yarn_45 as f32 * f32::EPSILON)).abs();
    assert!(
        ulps <= 4.0,
        "f32 emulation is {ulps} ulps from transformers"
    );

    // llama3 smooth band (factor 4, low 2, high 4, L0 4096) on a StableLM head, rotary 40;
    // pair 12 (wavelength 1578 in the blended band).
    let hf_llama3_12 = 0.0018839235417544842_f64;
    let json = r#"{"model_type": "stablelm", "num_attention_heads": 32, "hidden_size": 2560,
        "max_position_embeddings": 32768,
        "rope_parameters": {"type": "llama3", "factor": 4.0, "original_max_position_embeddings": 4096,
                            "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                            "partial_rotary_factor": 0.5}}"#;
    let rope = ModelRope::from_json_str(json, None).unwrap();
    let got = rope.frequencies().inv_freq()[12];
    let theta = 10_000f64.powf(-24.0 / 40.0);
    let lam = 2.0 * std::f64::consts::PI / theta;
    let t = (4096.0 / lam - 2.0) / 2.0;
    let exact = (1.0 - t) * theta / 4.0 + t * theta;
    assert!(((got - exact) / exact).abs() < 1e-14);
    let rel = ((got - hf_llama3_12) / hf_llama3_12).abs();
    assert!(rel > 1e-6 && rel < 2e-6, "{rel}");
    let theta32 = 1.0f32 / 10_000f32.powf(24.0f32 / 40.0f32);
    let lam32 = (2.0 * std::f64::consts::PI) as f32 / theta32;
    let t32 = (4096.0f32 / lam32 - 2.0) / 2.0;
    let emulated = (1.0 - t32) * theta32 / 4.0 + t32 * theta32;
    let ulps = ((emulated - hf_llama3_12 as f32) / (hf_llama3_12 as f32 * f32::EPSILON)).abs();
    assert!(
        ulps <= 4.0,
        "f32 emulation is {ulps} ulps from transformers"
    );
}
