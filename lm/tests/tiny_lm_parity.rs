//! Logit parity of ropex-lm's Rust forward pass with PyTorch.
//!
//! `tests/data/tiny_lm/parity.json` (at the repository root) holds logits that
//! `tools/train_tiny_lm.py --export-parity` computed in float64 from the committed
//! checkpoints under `assets/`; the Rust model (f32, attention through ropex's tiled
//! kernel) must match every case within [`TOLERANCE`]: plain RoPE on 64 bytes, ReRoPE
//! (w = 32) on the last 8 of 200 bytes, the inverse-Leaky-trained checkpoint under plain
//! RoPE, and Leaky ReRoPE (w = 32, k = 2).

use std::path::{Path, PathBuf};

use ndarray::Array3;
use ropex::PositionMap;
use ropex::attention::Attention;
use serde::Deserialize;

use ropex_lm::{ModelConfig, ModelError, Plan, TensorSpec, TinyLm, attend};

/// Just above the largest error measured over the four cases with each kernel ISA
/// (`ROPEX_KERNELS=portable`: 1.46e-5, `avx2`: 1.40e-5, AVX-512: 1.40e-5).
const TOLERANCE: f64 = 2e-5;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    model: String,
    map: MapSpec,
    input_bytes: Vec<u8>,
    positions_scored: [usize; 2],
    logits: Vec<Vec<f64>>,
}

#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
enum MapSpec {
    Rope,
    Rerope { window: usize },
    LeakyRerope { window: usize, leak: f64 },
}

impl MapSpec {
    fn to_map(&self) -> PositionMap {
        match *self {
            MapSpec::Rope => PositionMap::Rope,
            MapSpec::Rerope { window } => PositionMap::rerope(window).unwrap(),
            MapSpec::LeakyRerope { window, leak } => {
                PositionMap::leaky_rerope(window, leak).unwrap()
            }
        }
    }
}

/// The repository root (this crate is its `lm/` member), where `assets/` and
/// `tests/data/` live.
fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn load(name: &str) -> TinyLm {
    TinyLm::load(&root().join("assets").join(name)).unwrap()
}

#[test]
fn rust_forward_matches_pytorch_logits() {
    let text = std::fs::read_to_string(root().join("tests/data/tiny_lm/parity.json")).unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = fixture.cases.iter().map(|c| c.model.as_str()).collect();
    assert!(names.contains(&"tiny_lm_rope") && names.contains(&"tiny_lm_inv_leaky"));
    let maps: Vec<String> = fixture
        .cases
        .iter()
        .map(|c| format!("{:?}", c.map))
        .collect();
    assert!(
        maps.iter().any(|m| m.starts_with("Rerope")),
        "no ReRoPE case"
    );
    for case in &fixture.cases {
        let model = load(&case.model);
        let rope = model.config().rope().unwrap();
        let att = Attention::new(rope.frequencies(), model.layout(), case.map.to_map());
        let [start, end] = case.positions_scored;
        let logits = model
            .forward(&case.input_bytes, &Plan::Single(att), start)
            .unwrap();
        assert_eq!(case.logits.len(), end - start);
        let mut worst = 0f64;
        for (r, want) in case.logits.iter().enumerate() {
            assert_eq!(want.len(), logits.ncols());
            for (c, &w) in want.iter().enumerate() {
                worst = worst.max((logits[[r, c]] as f64 - w).abs());
            }
        }
        eprintln!(
            "{} {:?} ({} bytes, positions {start}..{end}): max |diff| {worst:.2e}",
            case.model,
            case.map,
            case.input_bytes.len()
        );
        assert!(
            worst < TOLERANCE,
            "{} {:?}: max |diff| {worst:e} exceeds {TOLERANCE:e}",
            case.model,
            case.map
        );
    }
}

/// The model's kernel ([`ropex_lm::attend`]) against ropex's f64 reference kernel on random
/// inputs, for every map the example uses.
#[test]
fn attend_matches_reference_kernel() {
    let mut s = 7u64;
    let mut rand = |shape: (usize, usize, usize)| {
        Array3::from_shape_fn(shape, |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
    };
    let (n, h, d) = (150, 2, 8);
    let (q, k, v) = (rand((n, h, d)), rand((n, h, d)), rand((n, h, d)));
    let rope = ropex::RopeConfig::new(d, 10_000.0).unwrap();
    let yarn = rope
        .clone()
        .with_scaling(ropex::Scaling::Yarn(ropex::Yarn::new(4.0, 32)))
        .unwrap();
    let maps = [
        PositionMap::Rope,
        PositionMap::rerope(16).unwrap(),
        PositionMap::leaky_rerope(20, 3.5).unwrap(),
    ];
    for cfg in [&rope, &yarn] {
        for map in maps {
            for log_n in [false, true] {
                let mut att = Attention::new(cfg.frequencies(), ropex::Layout::Half, map);
                if log_n {
                    att = att.with_log_n(32).unwrap();
                }
                let pos: Vec<usize> = (0..n).collect();
                let want = att
                    .reference(q.view(), k.view(), v.view(), &pos, &pos)
                    .unwrap();
                // Queries from position 40 on, against every key up to the last query.
                let got = attend(
                    &att,
                    q.slice(ndarray::s![40.., .., ..]),
                    k.view(),
                    v.view(),
                    &pos[40..],
                    &pos,
                )
                .unwrap();
                let worst = got
                    .iter()
                    .zip(want.slice(ndarray::s![40.., .., ..]).iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{map:?} log_n {log_n}: {worst:e}");
            }
        }
    }
}

#[test]
fn mismatched_checkpoint_is_a_clear_error() {
    let dir = root().join("assets/tiny_lm_rope");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let good = ModelConfig::load(&dir.join("config.json")).unwrap();

    // A config whose architecture disagrees with the tensors.
    let mut cfg = good.clone();
    cfg.mlp_hidden += 1;
    let err = TinyLm::from_bytes(cfg, &bytes).unwrap_err();
    assert!(matches!(err, ModelError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("w1"), "{err}");

    // A listed tensor with the wrong shape in the file.
    let mut cfg = good.clone();
    let mut lied = cfg.tensors.clone();
    for t in &mut lied {
        if t.name == "norm.weight" {
            t.shape = vec![129];
        }
    }
    cfg.tensors = lied;
    cfg.d_model = good.d_model; // architecture unchanged: the config lies about one tensor
    let err = TinyLm::from_bytes(cfg, &bytes).unwrap_err();
    assert!(err.to_string().contains("norm.weight"), "{err}");

    // A tensor missing from the file.
    let mut cfg = good.clone();
    cfg.tensors.push(TensorSpec {
        name: "extra.weight".into(),
        shape: vec![3],
    });
    let err = TinyLm::from_bytes(cfg, &bytes).unwrap_err();
    assert!(err.to_string().contains("extra.weight"), "{err}");

    // Not a safetensors file at all.
    let err = TinyLm::from_bytes(good, b"not a checkpoint").unwrap_err();
    assert!(matches!(err, ModelError::Mismatch(_)), "{err}");

    let err = TinyLm::load(Path::new("/nonexistent/model")).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}
