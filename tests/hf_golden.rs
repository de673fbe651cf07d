//! Parity with Hugging Face transformers (`tests/data/hf_golden.json`,
//! `tests/data/hf_models.json`, written by `tools/hf_golden.py` with transformers itself).
//!
//! How values are compared: transformers computes `inv_freq` in f32 (the exponent
//! `arange(0, dim, 2) / dim`, `base ** exponent`, `1 / x` and the YaRN/llama3 blends are
//! all f32 operations) and the golden files hold those f32 numbers exactly. ropex
//! computes in f64. Each ropex value `r` is compared with the f32 value `h` by relative
//! error `|r - h| / |h| <= 1e-6`; an exact zero (proportional RoPE's non-rotating pairs)
//! must be exactly zero. No f32 emulation is used: the f32 results carry a few ulps
//! (~6e-8 each) of rounding, amplified by `ln(base) * 2j/d` in the power (at most
//! ~14 for base 1e6), so the worst expected gap is about 1e-6 only in theory; the
//! observed maximum is printed by the test and reported in the crate notes. The attention
//! factor is a Python float (f64) in transformers and is compared the same way.
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
