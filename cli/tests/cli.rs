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
            vec!["positions", "--map", "rerope:0"],
            "streaming:SINKS:WINDOW",
        ),
        (vec!["positions", "--map", "wat:3"], "self-extend:G:W"),
        (vec!["positions", "--map", "self-extend:0:4"], "group"),
        (vec!["positions", "--map", "dca:4:4"], "local_window"),
        (vec!["positions", "--map", "streaming:0:0"], "--map"),
        (
            vec!["positions", "--map", "rope", "--sliding-window", "0"],
            "sliding window",
        ),
        (
            vec!["positions", "--map", "rope", "--chunked", "0"],
            "chunk",
        ),
        (
            vec![
                "freqs",
                "--config",
                "tests/data/gguf/llama3_1.config.json",
                "--gguf",
                "tests/data/gguf/llama3_1.gguf",
            ],
            "cannot be used with",
        ),
        (
            vec![
                "freqs",
                "--gguf",
                "tests/data/gguf/llama3_1.gguf",
                "--strict",
            ],
            "--config only",
        ),
        (
            vec!["freqs", "--gguf", "tests/data/gguf/llama3_1.config.json"],
            "GGUF",
        ),
        (vec!["explain"], "--gguf"),
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
    let help = stdout(&out);
    for flag in [
        "--sliding-window",
        "--chunked",
        "self-extend:G:W",
        "dca:",
        "streaming:",
    ] {
        assert!(help.contains(flag), "attend --help lacks {flag}");
    }
    let out = ropex(&["positions", "--help"]);
    assert!(stdout(&out).contains("print as '-'"), "{}", stdout(&out));

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
    let (q, k, v) = write_qkv(&dir, 0x2545_f491_4f6c_dd1d);
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
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

/// Pseudo-random inputs (xorshift from `seed`) written to `dir` as q.npy, k.npy, v.npy:
/// q [9, 4, 16], k/v [12, 2, 16] (GQA; the queries are the last 9 of 12 positions).
fn write_qkv(dir: &std::path::Path, seed: u64) -> (Array3<f32>, Array3<f32>, Array3<f32>) {
    let mut seed = seed;
    let mut rnd = |shape: (usize, usize, usize)| {
        Array3::from_shape_fn(shape, |_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
    };
    let (q, k, v) = (rnd((9, 4, 16)), rnd((12, 2, 16)), rnd((12, 2, 16)));
    for (name, a) in [("q.npy", &q), ("k.npy", &k), ("v.npy", &v)] {
        write_npy(dir.join(name), a).unwrap();
    }
    (q, k, v)
}

/// `ropex attend` on the q/k/v of [`write_qkv`] in `dir` with plain RoPE frequencies of
/// base 10000 and `extra` options: its stdout and output.
fn attend_in(dir: &std::path::Path, extra: &[&str]) -> (String, Array3<f32>) {
    let file = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (q, k, v, o) = (file("q.npy"), file("k.npy"), file("v.npy"), file("o.npy"));
    let mut args = vec![
        "attend", "--q", &q, "--k", &k, "--v", &v, "--out", &o, "--base", "10000",
    ];
    args.extend(extra);
    let out = ropex(&args);
    assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
    (stdout(&out), read_npy(&o).unwrap())
}

/// Every map `--map` accepts, alone and under the masks, through every kernel of the
/// CLI, against the library's f64 reference kernel on the same inputs.
#[test]
fn attend_runs_every_map_and_mask_like_the_reference_kernel() {
    let dir = tmp_dir("maps");
    let (q, k, v) = write_qkv(&dir, 0x9e37_79b9_7f4a_7c15);
    let freqs = ropex::RopeConfig::new(16, 10_000.0).unwrap().frequencies();
    let q_pos: Vec<usize> = (3..12).collect();
    let k_pos: Vec<usize> = (0..12).collect();
    // (map, sliding window, chunk)
    let cases: &[(&str, Option<usize>, Option<usize>)] = &[
        ("self-extend:2:3", None, None),
        ("self-extend:3:4:6", None, None),
        ("dca:5:2", None, None),
        ("streaming:2:3", None, None),
        ("interp:2", Some(5), None),
        ("rerope:3", Some(5), None),
        ("leaky:3:2", None, Some(5)),
        ("self-extend:2:3", Some(7), None),
        ("dca:6:2", None, Some(4)),
        ("streaming:1:4", Some(6), Some(10)),
    ];
    for &(map_text, window, chunk) in cases {
        let map: PositionMap = map_text.parse().unwrap();
        let mut att = Attention::new(freqs.clone(), Layout::Half, map);
        let mut extra = vec!["--map".to_string(), map_text.to_string()];
        if let Some(w) = window {
            att = att.with_sliding_window(w).unwrap();
            extra.extend(["--sliding-window".into(), w.to_string()]);
        }
        if let Some(c) = chunk {
            att = att.with_chunked(c).unwrap();
            extra.extend(["--chunked".into(), c.to_string()]);
        }
        let want = att
            .reference(q.view(), k.view(), v.view(), &q_pos, &k_pos)
            .unwrap();
        for (kernel, tolerance) in [
            (Some("reference"), 0.0),
            (Some("two-pass"), 1e-5),
            (None, 1e-5),
        ] {
            let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
            if let Some(kernel) = kernel {
                args.extend(["--kernel", kernel]);
            }
            let (text, got) = attend_in(&dir, &args);
            let named = format!("({} kernel, {map}", kernel.unwrap_or("tiled"));
            assert!(text.contains(&named), "{args:?}: {text}");
            assert_eq!(got.dim(), (9, 4, 16));
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= tolerance, "{args:?}: max abs diff {diff}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The masks through the CLI against attention computed without them on only the keys
/// each query may see: `|i - j| < N` for `--sliding-window N`, the query's own C-chunk
/// for `--chunked C`.
#[test]
fn attend_masks_equal_attention_over_the_visible_keys_only() {
    let dir = tmp_dir("masks");
    let (q, k, v) = write_qkv(&dir, 0x9e37_79b9_7f4a_7c15);
    let plain = Attention::new(
        ropex::RopeConfig::new(16, 10_000.0).unwrap().frequencies(),
        Layout::Half,
        PositionMap::Rope,
    );
    let (_, unmasked) = attend_in(&dir, &["--map", "rope"]);
    /// Whether a mask of this size lets query `i` see key `j`.
    type Visible = fn(usize, usize, usize) -> bool;
    let cases: [(&str, usize, Visible); 2] = [
        ("--sliding-window", 4, |n, i, j| i.abs_diff(j) < n),
        ("--chunked", 5, |c, i, j| i / c == j / c),
    ];
    for (flag, size, visible) in cases {
        let (_, got) = attend_in(&dir, &["--map", "rope", flag, &size.to_string()]);
        assert!(
            max_abs_diff(&got, &unmasked) > 1e-3,
            "{flag} changed nothing"
        );
        for a in 0..9 {
            let i = 3 + a;
            let keys: Vec<usize> = (0..=i).filter(|&j| visible(size, i, j)).collect();
            let pick = |x: &Array3<f32>| x.select(ndarray::Axis(0), &keys);
            let (kk, vv) = (pick(&k), pick(&v));
            let qq = q.slice(ndarray::s![a..a + 1, .., ..]);
            let want = plain
                .reference(qq, kk.view(), vv.view(), &[i], &keys)
                .unwrap();
            let row = got.slice(ndarray::s![a..a + 1, .., ..]).to_owned();
            let diff = max_abs_diff(&row, &want);
            assert!(
                diff <= 1e-5,
                "{flag} {size}, query {i}: max abs diff {diff}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The cells of `ropex positions` output: one row per query, one string per key.
fn position_cells(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(2)
        .map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// `ropex positions` prints StreamingLLM and Self-Extend maps (and masks) as their closed
/// forms: StreamingLLM keeps sinks `j < S` at cache slot `j` and the query at slot
/// `min(i, S + W - 1)`, hiding the keys between; Self-Extend (LongLM) is `i - j` inside
/// the window and `floor(i/G) - floor(j/G) + W - floor(W/G)` beyond it.
#[test]
fn positions_prints_streaming_and_self_extend_maps_as_their_closed_forms() {
    let n = 12;
    let (sinks, window, group, neighbours) = (2, 4, 3, 4);
    let streaming = |i: usize, j: usize| -> Option<f64> {
        if i - j < window {
            Some((i - j) as f64)
        } else if j < sinks {
            Some((i.min(sinks + window - 1) - j) as f64)
        } else {
            None
        }
    };
    let self_extend = |i: usize, j: usize| -> Option<f64> {
        if i - j < neighbours {
            Some((i - j) as f64)
        } else {
            Some((i / group) as f64 - (j / group) as f64 + (neighbours - neighbours / group) as f64)
        }
    };
    /// `P(i, j)` for `j <= i`, `None` where the entry is hidden.
    type Expected<'a> = &'a dyn Fn(usize, usize) -> Option<f64>;
    let cases: [(String, Vec<&str>, Expected); 3] = [
        (format!("streaming:{sinks}:{window}"), vec![], &streaming),
        (
            format!("self-extend:{group}:{neighbours}"),
            vec![],
            &self_extend,
        ),
        // A mask on top: only keys with i - j < 5 and in the query's 6-chunk.
        (
            format!("self-extend:{group}:{neighbours}"),
            vec!["--sliding-window", "5", "--chunked", "6"],
            &|i, j| {
                (i - j < 5 && i / 6 == j / 6)
                    .then(|| self_extend(i, j))
                    .flatten()
            },
        ),
    ];
    for (map_text, masks, want) in cases {
        let map: PositionMap = map_text.parse().unwrap();
        let n_text = n.to_string();
        let mut args = vec!["positions", "--map", map_text.as_str(), "--n", &n_text];
        args.extend(&masks);
        let out = ropex(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let cells = position_cells(&stdout(&out));
        assert_eq!(cells.len(), n, "{args:?}");
        let mut hidden = 0;
        for (i, row) in cells.iter().enumerate() {
            assert_eq!(row.len(), n, "{args:?}");
            for (j, cell) in row.iter().enumerate() {
                if j > i {
                    assert_eq!(cell, ".", "{args:?} ({i}, {j})");
                    continue;
                }
                match want(i, j) {
                    None => {
                        assert_eq!(cell, "-", "{args:?} ({i}, {j})");
                        hidden += 1;
                    }
                    Some(p) => {
                        let got: f64 = cell.parse().unwrap_or_else(|_| {
                            panic!("{args:?} ({i}, {j}): '{cell}' is not a number")
                        });
                        assert_eq!(got, p, "{args:?} ({i}, {j})");
                        assert_eq!(got, map.position(i, j), "{args:?} ({i}, {j})");
                    }
                }
            }
        }
        if map_text.starts_with("streaming") || !masks.is_empty() {
            assert!(hidden > 0, "{args:?} hides nothing");
        }
    }

    // Self-Extend is causal-only: without the causal mask the keys after the query are
    // hidden ('-'), while two-sided RoPE prints them as negative distances.
    let out = ropex(&[
        "positions",
        "--map",
        "self-extend:2:2",
        "--n",
        "3",
        "--non-causal",
    ]);
    assert_eq!(
        position_cells(&stdout(&out)),
        [["0", "-", "-"], ["1", "0", "-"], ["2", "1", "0"]]
    );
    let out = ropex(&["positions", "--map", "rope", "--n", "3", "--non-causal"]);
    assert_eq!(
        position_cells(&stdout(&out)),
        [["0", "-1", "-2"], ["1", "0", "-1"], ["2", "1", "0"]]
    );
}

/// `freqs --gguf` and `explain --gguf` read the same frequencies as the model's
/// config.json (the fixtures under tests/data/gguf are written by gguf-py from those
/// configs), and `freqs --gguf --json` adds the layout llama.cpp's rope type names:
/// LLAMA_ROPE_TYPE_NORM (interleaved) for llama, NEOX (rotate_half) for qwen2 and phi3.
#[test]
fn gguf_gives_the_same_frequencies_as_the_config_json() {
    let cases = [
        ("llama_plain", "interleaved"),
        ("llama3_1", "interleaved"),
        ("llama3_2", "interleaved"),
        ("llama_yarn_full", "interleaved"),
        ("qwen2_yarn", "half"),
        ("phi3_longrope", "half"),
    ];
    let json = |args: &[&str]| -> Value {
        let out = ropex(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    for (name, layout) in cases {
        let config = format!("tests/data/gguf/{name}.config.json");
        let gguf = format!("tests/data/gguf/{name}.gguf");
        for seq in [None, Some("200000")] {
            let mut a = vec!["freqs", "--config", config.as_str(), "--json"];
            let mut b = vec!["freqs", "--gguf", gguf.as_str(), "--json"];
            if let Some(n) = seq {
                a.extend(["--seq-len", n]);
                b.extend(["--seq-len", n]);
            }
            let (want, got) = (json(&a), json(&b));
            assert_eq!(want.as_object().unwrap().len(), 2, "{name}");
            assert_eq!(got.as_object().unwrap().len(), 3, "{name}");
            assert_eq!(got["layout"], layout, "{name}");
            let (w, g) = (
                want["inv_freq"].as_array().unwrap(),
                got["inv_freq"].as_array().unwrap(),
            );
            assert_eq!(w.len(), g.len(), "{name}");
            assert!(!w.is_empty());
            for (x, y) in w.iter().zip(g) {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!((x - y).abs() <= 1e-12 * x.abs(), "{name}: {x} vs {y}");
            }
            let (x, y) = (
                want["attention_factor"].as_f64().unwrap(),
                got["attention_factor"].as_f64().unwrap(),
            );
            assert!(
                (x - y).abs() <= 1e-12,
                "{name}: attention factor {x} vs {y}"
            );
        }
    }

    // The beta-base table from the GGUF equals the config's, line for line after the
    // description: same training length (8192), target (131072) and frequencies.
    let out_config = ropex(&[
        "explain",
        "--config",
        "tests/data/gguf/llama3_1.config.json",
    ]);
    let out_gguf = ropex(&["explain", "--gguf", "tests/data/gguf/llama3_1.gguf"]);
    assert!(out_gguf.status.success(), "{}", stderr(&out_gguf));
    let (a, b) = (stdout(&out_config), stdout(&out_gguf));
    assert!(b.lines().next().unwrap().contains("gguf arch llama"), "{b}");
    assert!(b.contains("# train_len 8192, target_len 131072"), "{b}");
    assert_eq!(
        a.lines().skip(1).collect::<Vec<_>>(),
        b.lines().skip(1).collect::<Vec<_>>()
    );
    assert!(b.lines().last().unwrap().starts_with("pairs 0-"), "{b}");
}
