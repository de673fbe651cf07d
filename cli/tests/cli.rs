//! The `ropex` command, run as a process (cargo builds it for this test and names it in
//! `CARGO_BIN_EXE_ropex`), from the repository root so that paths under `tests/data`
//! resolve.

use std::path::PathBuf;
use std::process::{Command, Output};

use ndarray::Array3;
use ndarray_npy::{read_npy, write_npy};
use ropex::attention::Attention;
use ropex::config::ModelRope;
use ropex::{Layout, PositionMap};
use serde_json::Value;

/// The repository root (this crate is its `cli/` member).
fn manifest() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ropex")
}

fn ropex(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(manifest())
        .output()
        .expect("run ropex")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The largest `|a - b|` over two arrays of the same shape.
fn max_abs_diff(a: &Array3<f32>, b: &Array3<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// A scratch directory per test (tests run in parallel).
fn tmp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ropex-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn freqs_json_reproduces_transformers_on_real_model_configs() {
    let models: Value = serde_json::from_str(
        &std::fs::read_to_string(manifest().join("tests/data/hf_models.json")).unwrap(),
    )
    .unwrap();
    let cases = models["cases"].as_array().unwrap();
    let mut files: Vec<String> = std::fs::read_dir(manifest().join("tests/data/configs"))
        .unwrap()
        .map(|e| format!("configs/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    files.sort();
    assert_eq!(files.len(), 5);
    let mut checked = 0;
    for case in cases {
        let file = case["config_file"].as_str().unwrap();
        assert!(
            files.iter().any(|f| f == file),
            "{file} not in tests/data/configs"
        );
        let path = format!("tests/data/{file}");
        let mut args = vec!["freqs", "--config", path.as_str(), "--json"];
        let seq = case["seq_len"].as_u64().map(|n| n.to_string());
        if let Some(s) = &seq {
            args.extend(["--seq-len", s.as_str()]);
        }
        let out = ropex(&args);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.starts_with("{\"inv_freq\":["), "{text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got.as_object().unwrap().len(), 2);
        let want_inv = case["inv_freq"].as_array().unwrap();
        let got_inv = got["inv_freq"].as_array().unwrap();
        assert_eq!(got_inv.len(), want_inv.len(), "{file}");
        for (g, w) in got_inv.iter().zip(want_inv) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!(((g - w) / w).abs() <= 1e-6, "{file}: {g} vs {w}");
        }
        let (g, w) = (
            got["attention_factor"].as_f64().unwrap(),
            case["attention_factor"].as_f64().unwrap(),
        );
        assert!(((g - w) / w).abs() <= 1e-6, "{file}: attention {g} vs {w}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn bad_input_gives_one_error_line_and_nonzero_exit() {
    let dir = tmp_dir("bad_input");
    let bad_json = dir.join("bad.json");
    std::fs::write(&bad_json, "{\"rope_theta\": 10000,").unwrap();
    let unknown = dir.join("unknown.json");
    std::fs::write(
        &unknown,
        r#"{"hidden_size": 64, "num_attention_heads": 2, "rope_scaling": {"type": "spiral", "factor": 2}}"#,
    )
    .unwrap();
    let invalid = dir.join("invalid.json");
    std::fs::write(
        &invalid,
        r#"{"hidden_size": 64, "num_attention_heads": 2, "rope_scaling": {"type": "linear", "factor": "two"}}"#,
    )
    .unwrap();
    let not_npy = dir.join("q.npy");
    std::fs::write(&not_npy, "not an npy file").unwrap();
    let (b, u, i, q) = (
        bad_json.to_str().unwrap(),
        unknown.to_str().unwrap(),
        invalid.to_str().unwrap(),
        not_npy.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "no command"),
        (vec!["frobnicate"], "unknown command"),
        (vec!["freqs"], "--config"),
        (
            vec!["freqs", "--config", "/nonexistent/config.json"],
            "No such file",
        ),
        (vec!["freqs", "--config", b], "not valid JSON"),
        (vec!["freqs", "--config", u], "unknown rope type 'spiral'"),
        (vec!["freqs", "--config", i], "rope_scaling.factor"),
        (
            vec![
                "freqs",
                "--config",
                "tests/data/configs/llama3_1_8b.json",
                "--seq-len",
                "-3",
            ],
            "--seq-len",
        ),
        (
            vec![
                "freqs",
                "--config",
                "tests/data/configs/llama3_1_8b.json",
                "--wat",
            ],
            "unknown option --wat",
        ),
        (
            vec![
                "freqs",
                "--config",
                "tests/data/configs/llama3_1_8b.json",
                "--json=yes",
            ],
            "takes no value",
        ),
        (
            vec![
                "freqs",
                "--config",
                "tests/data/configs/llama3_1_8b.json",
                "--layer-type",
                "x",
            ],
            "layer_type",
        ),
        (
            vec![
                "freqs",
                "--config",
                "tests/data/configs/phi3_mini_128k_instruct.json",
                "--strict",
            ],
            "strict mode",
        ),
        (
            vec![
                "explain",
                "--config",
                "tests/data/configs/llama3_1_8b.json",
                "--train-len",
                "0",
            ],
            "train-len",
        ),
        (vec!["positions", "--map", "leaky:8"], "--map"),
        (vec!["positions", "--map", "rerope:0"], "window"),
        (
            vec![
                "positions",
                "--map",
                "rope",
                "--n",
                "100000",
                "--keys",
                "100000",
            ],
            "too large",
        ),
        (
            vec![
                "positions",
                "--map",
                "rope",
                "--n",
                "2",
                "--offset",
                "18446744073709551615",
            ],
            "too large",
        ),
        (
            vec![
                "attend",
                "--q",
                q,
                "--k",
                q,
                "--v",
                q,
                "--base",
                "10000",
                "--out",
                "/tmp/x.npy",
            ],
            "not a valid .npy",
        ),
        (
            vec![
                "attend",
                "--q",
                q,
                "--k",
                q,
                "--v",
                q,
                "--out",
                "/tmp/x.npy",
            ],
            "--config FILE or --base",
        ),
        (
            vec![
                "attend", "--q", q, "--k", q, "--v", q, "--base", "1e4", "--layout", "diagonal",
                "--out", "o",
            ],
            "--layout",
        ),
    ];
    for (args, want) in cases {
        let out = ropex(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed {}", stdout(&out));
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: '{err}' lacks '{want}'");
        assert!(!err.contains("panicked") && !err.contains("backtrace"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_and_explain_and_positions() {
    let out = ropex(&["--help"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("COMMANDS:"));
    let out = ropex(&["attend", "--help"]);
    assert!(out.status.success() && stdout(&out).contains("--kernel"));

    let out = ropex(&["explain", "--config", "tests/data/configs/llama3_1_8b.json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("pairs 0-28 extrapolated, 29-34 blended, 35-63 interpolated; "),
        "{last}"
    );
    assert!(
        last.contains("29 pairs never completed a turn in training"),
        "{last}"
    );
    // 64 pair rows + header + 3 comment lines + summary.
    assert_eq!(text.lines().count(), 64 + 1 + 3 + 1);

    let out = ropex(&["positions", "--map", "leaky:4:2", "--n", "8"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let row7: Vec<&str> = text
        .lines()
        .find(|l| l.trim_start().starts_with("7 |"))
        .unwrap()
        .split('|')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row7, ["5.500", "5", "4.500", "4", "3", "2", "1", "0"]);
    let out = ropex(&[
        "positions",
        "--map",
        "rerope:2",
        "--n",
        "3",
        "--offset",
        "2",
    ]);
    let rows: Vec<String> = stdout(&out)
        .lines()
        .skip(2)
        .map(|l| l.split('|').nth(1).unwrap().trim().to_string())
        .collect();
    assert_eq!(rows, ["2 1 0 . .", "2 2 1 0 .", "2 2 2 1 0"]);
}

#[test]
fn attend_round_trips_npy_and_matches_the_reference_kernel() {
    let dir = tmp_dir("attend");
    // Deterministic pseudo-random inputs: q [9, 4, 16], k/v [12, 2, 16] (GQA, chunked).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |shape: (usize, usize, usize)| {
        Array3::from_shape_fn(shape, |_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
    };
    let (q, k, v) = (rnd((9, 4, 16)), rnd((12, 2, 16)), rnd((12, 2, 16)));
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    write_npy(path("q.npy"), &q).unwrap();
    write_npy(path("k.npy"), &k).unwrap();
    write_npy(path("v.npy"), &v).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64,
            "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            "ropex_position_map": {"type": "leaky_rerope", "window": 3, "leak": 2}}"#,
    )
    .unwrap();
    let rope = ModelRope::from_path(&config, None).unwrap();
    let q_pos: Vec<usize> = (3..12).collect();
    let k_pos: Vec<usize> = (0..12).collect();
    let cfg = config.to_string_lossy().into_owned();
    let runs: Vec<(Vec<String>, Attention)> = vec![
        (
            // The map comes from the config's ropex_position_map.
            vec!["--config".into(), cfg.clone()],
            Attention::new(
                rope.frequencies_for_len(12),
                Layout::Half,
                PositionMap::leaky_rerope(3, 2.0).unwrap(),
            ),
        ),
        (
            vec![
                "--base".into(),
                "500".into(),
                "--map".into(),
                "rerope:4".into(),
                "--layout".into(),
                "interleaved".into(),
                "--non-causal".into(),
                "--log-n".into(),
                "8".into(),
            ],
            Attention::new(
                ropex::RopeConfig::new(16, 500.0).unwrap().frequencies(),
                Layout::Interleaved,
                PositionMap::rerope(4).unwrap(),
            )
            .with_causal(false)
            .with_log_n(8)
            .unwrap(),
        ),
    ];
    for (extra, att) in runs {
        let want = att
            .reference(q.view(), k.view(), v.view(), &q_pos, &k_pos)
            .unwrap();
        // `--kernel reference` reproduces the library's reference kernel exactly; the
        // default kernel is the tiled one, within f32 rounding of it.
        for (kernel, tolerance) in [(Some("reference"), 0.0), (None, 1e-6)] {
            let mut args: Vec<String> = ["attend", "--q", &path("q.npy"), "--k", &path("k.npy")]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(["--v".into(), path("v.npy"), "--out".into(), path("o.npy")]);
            args.extend(extra.clone());
            if let Some(kernel) = kernel {
                args.extend(["--kernel".into(), kernel.into()]);
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = ropex(&argv);
            assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
            let used = format!("({} kernel,", kernel.unwrap_or("tiled"));
            assert!(stdout(&out).contains(&used), "{extra:?}: {}", stdout(&out));
            let got: Array3<f32> = read_npy(path("o.npy")).unwrap();
            assert_eq!(got.dim(), (9, 4, 16));
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff <= tolerance,
                "{extra:?} {kernel:?}: max abs diff {diff}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ReRoPE and Leaky ReRoPE computed in PyTorch the way Su's bojone/rerope patch does it
/// (two full score matrices, band select, causal softmax; `tools/rerope_reference.py`)
/// must match `ropex attend` with every kernel.
#[test]
fn attend_matches_the_pytorch_two_pass_reference() {
    let dir = tmp_dir("bojone");
    let cases = manifest().join("tests/data/rerope_ref");
    let mut seen = 0;
    for entry in std::fs::read_dir(&cases).unwrap() {
        let case = entry.unwrap().path();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("meta.json")).unwrap())
                .unwrap();
        let w = meta["w"].as_u64().unwrap();
        let map = match meta["kind"].as_str().unwrap() {
            "rerope" => format!("rerope:{w}"),
            "leaky_rerope" => format!("leaky:{w}:{}", meta["k"].as_f64().unwrap()),
            other => panic!("unknown case kind {other}"),
        };
        let base = meta["base"].as_f64().unwrap().to_string();
        let want: Array3<f32> = read_npy(case.join("out.npy")).unwrap();
        let file = |n: &str| case.join(n).to_string_lossy().into_owned();
        for kernel in ["reference", "two-pass", "tiled"] {
            let out_path = dir
                .join(format!("{kernel}.npy"))
                .to_string_lossy()
                .into_owned();
            let out = ropex(&[
                "attend",
                "--q",
                &file("q.npy"),
                "--k",
                &file("k.npy"),
                "--v",
                &file("v.npy"),
                "--map",
                &map,
                "--base",
                &base,
                "--kernel",
                kernel,
                "--out",
                &out_path,
            ]);
            assert!(out.status.success(), "{}: {}", case.display(), stderr(&out));
            let got: Array3<f32> = read_npy(&out_path).unwrap();
            assert_eq!(got.dim(), want.dim());
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "{} with {kernel}: max abs diff {diff}",
                case.display()
            );
        }
        seen += 1;
    }
    assert_eq!(seen, 3, "expected the three committed PyTorch cases");
    std::fs::remove_dir_all(&dir).unwrap();
}
