//! The GGUF reader against files written by the PyPI `gguf` package
//! (tools/make_gguf_fixtures.py): metadata and the tensor index read back as written
//! (offsets as gguf-py's own reader sees them), the same model's config.json and GGUF
//! give the same frequencies, dequantisation equals `gguf.quants.dequantize`, and
//! corrupt, truncated or random bytes give typed errors, never a panic.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use ropex::config::ModelRope;
use ropex::gguf::{
    Array, GgmlType, Gguf, GgufFile, GgufRope, Value, ValueType, permute_qk_rows, unpermute_qk_rows,
};
use ropex::{Layout, RopeConfig, RopeError, RotaryTable, Scaling};
use serde_json::{Value as Json, json};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/gguf")
        .join(name)
}

fn expected() -> Json {
    let text = std::fs::read_to_string(data("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A value in expected.json's form: `{"type": gguf-py type name, "value": ...}`.
fn to_json(v: &Value) -> Json {
    let value = match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => json!(f64::from(*x)),
        Value::F64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(a) => Json::Array((0..a.len()).map(|i| to_json(&a.get(i).unwrap())).collect()),
    };
    json!({"type": v.value_type().name(), "value": value})
}

/// JSON equality with floats compared to 1e-15 relative: serde_json's default float
/// parser may be off by an ulp from Python's repr.
fn json_eq(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn metadata_of_every_type_and_the_tensor_index_read_back_as_written() {
    let want = expected();
    for (name, entry) in want.as_object().unwrap() {
        let file = GgufFile::open(data(&format!("{name}.gguf"))).unwrap();
        let g = file.header();
        assert_eq!(g.version() as u64, entry["version"], "{name}");
        assert_eq!(g.alignment(), entry["alignment"], "{name}");
        assert_eq!(g.data_offset(), entry["data_offset"], "{name}");
        assert_eq!(g.file_len(), entry["file_len"], "{name}");
        let meta = entry["metadata"].as_object().unwrap();
        assert_eq!(g.metadata().len(), meta.len(), "{name}: key count");
        for (key, value) in meta {
            let got = g
                .get(key)
                .unwrap_or_else(|| panic!("{name}: key {key} missing"));
            assert!(
                json_eq(&to_json(got), value),
                "{name}: {key}: {got:?} vs {value}"
            );
        }
        let tensors = entry["tensors"].as_object().unwrap();
        assert_eq!(g.tensors().len(), tensors.len(), "{name}: tensor count");
        for (tname, t) in tensors {
            let info = g.tensor(tname).unwrap();
            assert_eq!(info.ggml_type().name(), t["type"], "{name}: {tname}");
            assert_eq!(json!(info.dims()), t["dims"], "{name}: {tname}");
            assert_eq!(
                g.data_offset() + info.offset(),
                t["data_offset"],
                "{name}: {tname}"
            );
        }
    }
}

#[test]
fn typed_accessors_see_through_the_value_types() {
    let g = Gguf::from_bytes(&std::fs::read(data("every_type_v3.gguf")).unwrap()).unwrap();
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get("t.u64").unwrap().as_u64(), Some(u64::MAX));
    assert_eq!(g.get("t.u64").unwrap().as_i64(), None);
    assert_eq!(g.get("t.i64").unwrap().as_i64(), Some(i64::MIN));
    assert_eq!(g.get("t.i8").unwrap().as_u64(), None);
    assert_eq!(g.get("t.f32").unwrap().as_f64(), Some(f64::from(0.1f32)));
    assert_eq!(g.get("t.bool_true").unwrap().as_bool(), Some(true));
    let strings = g.get("t.arr_str").unwrap().as_array().unwrap();
    assert_eq!(strings.element_type(), ValueType::String);
    assert_eq!(strings.as_strings().unwrap(), ["a", "", "ünï"]);
    let nested = g.get("t.arr_nested").unwrap().as_array().unwrap();
    assert_eq!(
        nested,
        &Array::Array(vec![
            Array::I32(vec![1, 2]),
            Array::I32(vec![3]),
            Array::I32(vec![4, 5, 6])
        ])
    );
}

/// (fixture, rope type from config.json, expected layout)
const PAIRS: &[(&str, &str, Layout)] = &[
    ("llama_plain", "default", Layout::Interleaved),
    ("llama_linear", "linear", Layout::Interleaved),
    ("llama3_1", "llama3", Layout::Interleaved),
    ("llama3_2", "llama3", Layout::Interleaved),
    ("llama3_custom", "llama3", Layout::Interleaved),
    ("qwen2_plain", "default", Layout::Half),
    ("qwen2_yarn", "yarn", Layout::Half),
    ("llama_yarn_full", "yarn", Layout::Interleaved),
    ("phi3_longrope", "longrope", Layout::Half),
];

#[test]
fn config_json_and_gguf_of_the_same_model_give_the_same_frequencies() {
    for &(name, rope_type, layout) in PAIRS {
        let hf = ModelRope::from_path(data(&format!("{name}.config.json")), None).unwrap();
        let gg = GgufFile::open(data(&format!("{name}.gguf")))
            .unwrap()
            .rope()
            .unwrap();
        assert_eq!(hf.rope_type, rope_type, "{name}");
        assert_eq!(
            gg.config.scaling().rope_type(),
            hf.config.scaling().rope_type(),
            "{name}"
        );
        assert_eq!(gg.layout, layout, "{name}");
        assert_eq!(gg.config.head_dim(), hf.config.head_dim(), "{name}");
        assert_eq!(gg.config.rotary_dim(), hf.config.rotary_dim(), "{name}");
        assert_eq!(gg.context_len, hf.max_position_embeddings, "{name}");
        if rope_type != "default" && rope_type != "linear" {
            assert_eq!(
                gg.original_context_len, hf.original_max_position_embeddings,
                "{name}"
            );
        }
        for len in [None, Some(1), Some(200_000)] {
            let (a, b) = match len {
                None => (hf.frequencies(), gg.config.frequencies()),
                Some(n) => (hf.frequencies_for_len(n), gg.config.frequencies_for_len(n)),
            };
            assert_eq!(a.num_pairs(), b.num_pairs(), "{name}");
            for (j, (x, y)) in a.inv_freq().iter().zip(b.inv_freq()).enumerate() {
                assert!((x - y).abs() <= 1e-12, "{name} pair {j}: {x} vs {y}");
            }
            let (fa, fb) = (a.attention_factor(), b.attention_factor());
            assert!(
                (fa - fb).abs() <= 1e-12,
                "{name}: attention factor {fa} vs {fb}"
            );
        }
    }
}

#[test]
fn llama3_rope_freqs_are_recognised_with_their_parameters() {
    let gg = GgufFile::open(data("llama3_2.gguf"))
        .unwrap()
        .rope()
        .unwrap();
    assert_eq!(gg.scaling_type, "rope_freqs");
    match gg.config.scaling() {
        Scaling::Llama3(l) => {
            assert_eq!(
                (l.factor, l.low_freq_factor, l.high_freq_factor),
                (32.0, 1.0, 4.0)
            );
            assert_eq!(l.original_max_position_embeddings, 8192);
        }
        other => panic!("expected llama3, got {other:?}"),
    }
    let custom = GgufRope::from_path(data("llama3_custom.gguf")).unwrap();
    match custom.config.scaling() {
        Scaling::Llama3(l) => assert_eq!(
            (l.factor, l.low_freq_factor, l.high_freq_factor),
            (16.0, 2.0, 8.0)
        ),
        other => panic!("expected llama3, got {other:?}"),
    }
    // The stated YaRN attention factor 1.1 is an f32 in the file; the reader gives the
    // decimal back, and the config.json path agrees exactly.
    let y = GgufFile::open(data("llama_yarn_full.gguf"))
        .unwrap()
        .rope()
        .unwrap();
    assert_eq!(y.config.frequencies().attention_factor(), 1.1);
    assert_eq!(y.config.rotary_dim(), 96);
}

#[test]
fn yarn_with_a_partial_extrapolation_mix_has_no_ropex_equivalent() {
    let err = GgufFile::open(data("yarn_ext_half.gguf"))
        .unwrap()
        .rope()
        .unwrap_err();
    assert!(
        matches!(&err, RopeError::GgufUnsupported { what, .. } if what.contains("yarn_ext_factor")),
        "{err}"
    );
}

#[test]
fn dequantised_tensors_equal_gguf_py() {
    let want = expected();
    let want = want["tensors"]["dequantised"].as_object().unwrap();
    let mut file = GgufFile::open(data("tensors.gguf")).unwrap();
    assert_eq!(file.header().alignment(), 64);
    for (name, values) in want {
        let got = file.tensor_f32(name).unwrap();
        let values: Vec<f32> = values
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), values.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&values).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
        let info = file.header().tensor(name).unwrap().clone();
        assert_eq!(info.n_elements() as usize, got.len());
        assert_eq!(
            file.tensor_bytes(name).unwrap().len() as u64,
            info.n_bytes()
        );
    }
    let err = file.tensor_f32("no_such.weight").unwrap_err();
    assert!(matches!(err, RopeError::MissingKey { .. }), "{err}");
}

#[test]
fn the_converters_qk_permutation_is_undone() {
    let want = expected();
    let hf = &want["tensors"]["q_proj_hf_order"];
    let hf: Vec<f32> = hf["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let mut file = GgufFile::open(data("tensors.gguf")).unwrap();
    let permuted = file.tensor_f32("attn_q_permuted.weight").unwrap();
    assert_ne!(permuted, hf);
    assert_eq!(unpermute_qk_rows(&permuted, 2, 5).unwrap(), hf);
    assert_eq!(permute_qk_rows(&hf, 2, 5).unwrap(), permuted);
    assert!(matches!(
        unpermute_qk_rows(&permuted, 3, 5),
        Err(RopeError::ShapeMismatch { .. })
    ));
}

#[test]
fn interleaved_rotation_of_permuted_rows_is_half_rotation_of_the_original() {
    // q = W x per head; the converter's permuted W rotated with adjacent pairs, then
    // un-permuted, equals the original W rotated with rotate_half pairs.
    let (n_head, d, n_in) = (3, 16, 7);
    let w: Vec<f32> = (0..n_head * d * n_in)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..n_in).map(|i| (i as f32 * 0.37).sin()).collect();
    let project = |w: &[f32]| -> Vec<f32> {
        w.chunks_exact(n_in)
            .map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let freqs = RopeConfig::new(d, 10_000.0).unwrap().frequencies();
    let rotate = |mut q: Vec<f32>, layout: Layout| {
        let table = RotaryTable::<f32>::new(&freqs, 1000, layout).unwrap();
        table.rotate_slice(&mut q, [1, n_head, d], &[777]).unwrap();
        q
    };
    let half = rotate(project(&w), Layout::Half);
    let gguf_w = permute_qk_rows(&w, n_head, n_in).unwrap();
    let interleaved = rotate(project(&gguf_w), Layout::Interleaved);
    let back = unpermute_qk_rows(&interleaved, n_head, 1).unwrap();
    for (i, (a, b)) in half.iter().zip(&back).enumerate() {
        assert!((a - b).abs() < 1e-5, "dim {i}: {a} vs {b}");
    }
    // The trap: half-split rotation of the permuted rows is something else.
    let wrong = unpermute_qk_rows(&rotate(project(&gguf_w), Layout::Half), n_head, 1).unwrap();
    assert!(half.iter().zip(&wrong).any(|(a, b)| (a - b).abs() > 1e-2));
}

/// A minimal GGUF encoder for hand-made (and broken) files.
struct Builder {
    version: u32,
    kv: Vec<u8>,
    n_kv: u64,
    index: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            kv: Vec::new(),
            n_kv: 0,
            index: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }

    /// A key with a raw value type id and raw value bytes.
    fn raw(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn str(self, key: &str, s: &str) -> Self {
        let mut v = Vec::new();
        put_str(&mut v, s);
        self.raw(key, 8, &v)
    }

    fn u32(self, key: &str, x: u32) -> Self {
        self.raw(key, 4, &x.to_le_bytes())
    }

    fn f32(self, key: &str, x: f32) -> Self {
        self.raw(key, 6, &x.to_le_bytes())
    }

    fn tensor_f32(mut self, name: &str, values: &[f32]) -> Self {
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        put_str(&mut self.index, name);
        self.index.extend(1u32.to_le_bytes());
        self.index.extend((values.len() as u64).to_le_bytes());
        self.index.extend(0u32.to_le_bytes());
        self.index.extend((self.data.len() as u64).to_le_bytes());
        self.n_tensors += 1;
        for v in values {
            self.data.extend(v.to_le_bytes());
        }
        self
    }

    fn llama(self, arch: &str, head_dim: u32) -> Self {
        self.str("general.architecture", arch)
            .u32(&format!("{arch}.embedding_length"), head_dim * 4)
            .u32(&format!("{arch}.attention.head_count"), 4)
            .u32(&format!("{arch}.context_length"), 4096)
            .f32(&format!("{arch}.rope.freq_base"), 10_000.0)
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.index);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
}

fn format_error(bytes: &[u8]) -> String {
    match Gguf::from_bytes(bytes) {
        Err(RopeError::GgufFormat { message, .. }) => message,
        other => panic!("expected a GGUF format error, got {other:?}"),
    }
}

#[test]
fn the_hand_built_encoder_agrees_with_gguf_py() {
    // The test encoder and gguf-py write the same bytes for the same content, so the
    // broken files below differ from valid ones only where they are broken.
    let b = Builder::new()
        .str("general.architecture", "llama")
        .tensor_f32(
            "small.weight",
            &(0..8).map(|i| i as f32).collect::<Vec<_>>(),
        );
    let g = Gguf::from_bytes(&b.build()).unwrap();
    assert_eq!(g.tensors()[0].n_bytes(), 32);
    let bytes = b.build();
    let mut f = GgufFile::from_bytes(&bytes).unwrap();
    assert_eq!(f.tensor_f32("small.weight").unwrap()[7], 7.0);
}

#[test]
fn malformed_headers_give_typed_errors() {
    let ok = Builder::new().llama("llama", 64);
    assert!(Gguf::from_bytes(&ok.build()).is_ok());

    let mut bad = ok.build();
    bad[..4].copy_from_slice(b"GGML");
    assert!(format_error(&bad).contains("bad magic"));

    let mut v1 = ok.build();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        Gguf::from_bytes(&v1),
        Err(RopeError::GgufUnsupported { .. })
    ));
    let mut be = ok.build();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(
        Gguf::from_bytes(&be),
        Err(RopeError::GgufUnsupported { what, .. }) if what.contains("big-endian")
    ));
    let mut v9 = ok.build();
    v9[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(format_error(&v9).contains("unknown version"));

    // Counts the file cannot hold are refused before anything is allocated.
    let mut huge = ok.build();
    huge[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(format_error(&huge).contains("do not fit"));
    let mut huge_tensors = ok.build();
    huge_tensors[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(format_error(&huge_tensors).contains("do not fit"));
    let mut s = Vec::new();
    s.extend((1u64 << 62).to_le_bytes());
    assert!(format_error(&Builder::new().raw("k", 8, &s).build()).contains("do not fit"));
    let mut arr = 4u32.to_le_bytes().to_vec(); // u32 elements
    arr.extend((1u64 << 40).to_le_bytes());
    assert!(format_error(&Builder::new().raw("k", 9, &arr).build()).contains("do not fit"));

    assert!(format_error(&Builder::new().raw("k", 13, &[0]).build()).contains("value type 13"));
    assert!(format_error(&Builder::new().raw("k", 7, &[2]).build()).contains("bool"));
    let mut bad_utf8 = Vec::new();
    put_str(&mut bad_utf8, "ab");
    let n = bad_utf8.len();
    bad_utf8[n - 1] = 0xff;
    assert!(format_error(&Builder::new().raw("k", 8, &bad_utf8).build()).contains("UTF-8"));
    let dup = Builder::new().u32("k", 1).u32("k", 2);
    assert!(format_error(&dup.build()).contains("duplicate"));
    let odd = Builder::new().u32("general.alignment", 48);
    assert!(format_error(&odd.build()).contains("power of two"));
    let wrong_type = Builder::new().str("general.alignment", "32");
    assert!(format_error(&wrong_type.build()).contains("general.alignment"));

    // Arrays nested deeper than the bound.
    let mut deep = Vec::new();
    for _ in 0..20 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend(0u32.to_le_bytes());
    deep.extend(0u64.to_le_bytes());
    assert!(format_error(&Builder::new().raw("k", 9, &deep).build()).contains("nests"));

    // Tensor index problems.
    let t = Builder::new().tensor_f32("w", &[1.0; 8]);
    let bytes = t.build();
    let at = 24 + 8 + 1; // header, name length, name
    let mut dims5 = bytes.clone();
    dims5[at..at + 4].copy_from_slice(&5u32.to_le_bytes());
    assert!(format_error(&dims5).contains("at most 4"));
    let mut ty = bytes.clone();
    ty[at + 12..at + 16].copy_from_slice(&77u32.to_le_bytes());
    assert!(format_error(&ty).contains("unknown ggml type 77"));
    let mut q8 = bytes.clone(); // Q8_0 needs a first dim that is a multiple of 32
    q8[at + 12..at + 16].copy_from_slice(&8u32.to_le_bytes());
    assert!(format_error(&q8).contains("block size"));
    let mut misaligned = bytes.clone();
    misaligned[at + 16..at + 24].copy_from_slice(&4u64.to_le_bytes());
    assert!(format_error(&misaligned).contains("alignment"));
    let mut past_end = bytes.clone();
    past_end[at + 16..at + 24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(format_error(&past_end).contains("ends past"));
    let mut overflow = bytes.clone();
    overflow[at + 4..at + 12].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(format_error(&overflow).contains("overflow"));
}

#[test]
fn every_truncation_of_every_fixture_is_a_format_error() {
    for name in ["every_type_v3", "tensors", "llama3_1"] {
        let bytes = std::fs::read(data(&format!("{name}.gguf"))).unwrap();
        let g = Gguf::from_bytes(&bytes).unwrap();
        let end = g
            .tensors()
            .iter()
            .map(|t| g.data_offset() + t.offset() + t.n_bytes())
            .max()
            .unwrap();
        for n in 0..end as usize {
            match Gguf::from_bytes(&bytes[..n]) {
                Err(RopeError::GgufFormat { .. }) => {}
                other => panic!("{name} cut at {n}: {other:?}"),
            }
        }
    }
}

#[test]
fn architectures_and_conventions_ropex_cannot_represent_are_typed_errors() {
    let rope = |b: Builder| {
        let bytes = b.build();
        GgufFile::from_bytes(&bytes).unwrap().rope()
    };
    let unsupported = |r: ropex::Result<ropex::gguf::GgufRope>, word: &str| match r {
        Err(RopeError::GgufUnsupported { what, .. }) => assert!(what.contains(word), "{what}"),
        other => panic!("expected unsupported '{word}', got {other:?}"),
    };
    unsupported(rope(Builder::new().llama("gpt2", 64)), "no rotary");
    unsupported(rope(Builder::new().llama("qwen2vl", 64)), "M-RoPE");
    unsupported(rope(Builder::new().llama("not-an-arch", 64)), "not-an-arch");
    unsupported(
        rope(
            Builder::new()
                .llama("llama", 64)
                .str("llama.rope.scaling.type", "wild"),
        ),
        "wild",
    );
    unsupported(
        rope(
            Builder::new()
                .llama("llama", 64)
                .f32("llama.rope.scaling.attn_factor", 0.5),
        ),
        "attn_factor",
    );
    unsupported(
        rope(
            Builder::new()
                .llama("llama", 64)
                .str("llama.rope.scaling.type", "linear")
                .f32("llama.rope.scaling.factor", 2.0)
                .tensor_f32("rope_freqs.weight", &[1.0; 32]),
        ),
        "rope_freqs",
    );
    assert!(matches!(
        GgufFile::from_bytes(&Builder::new().build())
            .unwrap()
            .rope(),
        Err(RopeError::MissingKey { .. })
    ));
    let wrong_len = Builder::new()
        .llama("llama", 64)
        .tensor_f32("rope_freqs.weight", &[1.0; 31]);
    assert!(matches!(
        rope(wrong_len),
        Err(RopeError::ShapeMismatch { .. })
    ));
}

#[test]
fn free_rope_freqs_divide_each_pair_as_llama_cpp_does() {
    // Divisors that are no Llama 3 band pattern: inv_j = base^(-2j/d) / f_j.
    let f: Vec<f32> = (0..32).map(|j| 1.0 + 0.25 * (j % 5) as f32).collect();
    let b = Builder::new()
        .llama("llama", 64)
        .tensor_f32("rope_freqs.weight", &f);
    let bytes = b.build();
    let rope = GgufFile::from_bytes(&bytes).unwrap().rope().unwrap();
    assert!(matches!(rope.config.scaling(), Scaling::LongRope(_)));
    assert!(!rope.notes.is_empty());
    for len in [16, 100_000] {
        let freqs = rope.config.frequencies_for_len(len);
        for (j, &w) in freqs.inv_freq().iter().enumerate() {
            let want = 10_000f64.powf(-(2.0 * j as f64) / 64.0) / f64::from(f[j]);
            assert!(((w - want) / want).abs() < 1e-14, "pair {j}: {w} vs {want}");
        }
        assert_eq!(freqs.attention_factor(), 1.0);
    }
    // A YaRN ramp baked into rope_freqs comes with its magnitude as attn_factor.
    let meta = [1.0f32, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0].repeat(4);
    let b = Builder::new()
        .llama("llama", 64)
        .f32("llama.rope.scaling.attn_factor", 1.25)
        .tensor_f32("rope_freqs.weight", &meta);
    let bytes = b.build();
    let rope = GgufFile::from_bytes(&bytes).unwrap().rope().unwrap();
    assert_eq!(rope.config.frequencies().attention_factor(), 1.25);
    // LongRoPE needs its factor tensors.
    let b = Builder::new()
        .llama("phi3", 64)
        .str("phi3.rope.scaling.type", "longrope")
        .u32("phi3.rope.scaling.original_context_length", 1024);
    let bytes = b.build();
    let err = GgufFile::from_bytes(&bytes).unwrap().rope().unwrap_err();
    assert!(
        matches!(&err, RopeError::MissingKey { key, .. } if key.contains("rope_factors")),
        "{err}"
    );
}

#[test]
fn neox_architectures_rotate_halves_and_partial_rotary_is_read() {
    let b = Builder::new()
        .llama("phi2", 80)
        .u32("phi2.rope.dimension_count", 32);
    let bytes = b.build();
    let rope = GgufFile::from_bytes(&bytes).unwrap().rope().unwrap();
    assert_eq!(rope.layout, Layout::Half);
    assert_eq!((rope.config.head_dim(), rope.config.rotary_dim()), (80, 32));
    assert_eq!(rope.scaling_type, "none");
    // A legacy `rope.scale_linear` with no scaling type is linear, llama.cpp's default.
    let b = Builder::new()
        .llama("llama", 64)
        .f32("llama.rope.scale_linear", 2.0);
    let bytes = b.build();
    let rope = GgufFile::from_bytes(&bytes).unwrap().rope().unwrap();
    assert_eq!(rope.config.scaling(), &Scaling::linear(2.0));
    // ggml's YaRN with extrapolation mix 0: theta / s everywhere, no mscale.
    let b = Builder::new()
        .llama("llama", 64)
        .str("llama.rope.scaling.type", "yarn")
        .f32("llama.rope.scaling.factor", 4.0)
        .f32("llama.rope.scaling.yarn_ext_factor", 0.0);
    let bytes = b.build();
    let rope = GgufFile::from_bytes(&bytes).unwrap().rope().unwrap();
    assert_eq!(rope.config.scaling(), &Scaling::linear(4.0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut framed = b"GGUF\x03\0\0\0".to_vec();
        framed.extend(&bytes);
        for b in [&bytes, &framed] {
            if let Ok(mut f) = GgufFile::from_bytes(b) {
                let _ = f.rope();
            }
        }
    }

    #[test]
    fn corrupted_fixtures_never_panic(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let name = ["every_type_v3", "tensors", "llama3_1", "llama_yarn_full"][which];
        let mut bytes = std::fs::read(data(&format!("{name}.gguf"))).unwrap();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let len = cut.index(bytes.len() + 1);
        bytes.truncate(len.max(bytes.len() / 2));
        if let Ok(mut f) = GgufFile::from_bytes(&bytes) {
            let _ = f.rope();
            let names: Vec<String> = f.header().tensors().iter().map(|t| t.name().to_string()).collect();
            for n in names {
                if let Ok(x) = f.tensor_f32(&n) {
                    prop_assert_eq!(x.len() as u64, f.header().tensor(&n).unwrap().n_elements());
                }
            }
        }
    }
}

/// Where tools/fetch_smollm2.sh puts SmolLM2-135M-Instruct's Q4_1 GGUF, or
/// `ROPEX_SMOLLM2_GGUF`.
fn smollm2_path() -> PathBuf {
    match std::env::var_os("ROPEX_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

#[test]
fn smollm2_header_has_the_published_facts() {
    let path = smollm2_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED smollm2_header_has_the_published_facts: {} is absent; run tools/fetch_smollm2.sh (or set ROPEX_SMOLLM2_GGUF)",
            path.display()
        );
        return;
    }
    let mut file = GgufFile::open(&path).unwrap();
    let g = file.header();
    let uint = |k: &str| g.get(k).and_then(Value::as_u64).unwrap();
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(uint("llama.block_count"), 30);
    assert_eq!(uint("llama.embedding_length"), 576);
    assert_eq!(uint("llama.attention.head_count"), 9);
    assert_eq!(uint("llama.attention.head_count_kv"), 3);
    assert_eq!(uint("llama.feed_forward_length"), 1536);
    assert_eq!(uint("llama.context_length"), 8192);
    assert_eq!(
        g.get("tokenizer.ggml.pre").and_then(Value::as_str),
        Some("smollm")
    );
    let vocab = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(vocab.len(), 49152);
    // Tied embeddings: no output.weight; Q8_0 embeddings, Q4_1 projections, F32 norms.
    assert!(g.tensor("output.weight").is_none());
    let ty = |n: &str| g.tensor(n).unwrap().ggml_type();
    assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q4_1);
    assert_eq!(ty("blk.29.ffn_down.weight"), GgmlType::Q4_1);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
    assert_eq!(g.tensor("blk.0.attn_k.weight").unwrap().dims(), [576, 192]);
    assert_eq!(
        g.tensors()
            .iter()
            .filter(|t| t.name().starts_with("blk."))
            .count(),
        30 * 9
    );

    let rope = file.rope().unwrap();
    assert_eq!(rope.layout, Layout::Interleaved);
    assert_eq!(rope.config.head_dim(), 64);
    assert_eq!(rope.config.base(), 100_000.0);
    assert_eq!(rope.context_len, Some(8192));
    assert_eq!(rope.config.scaling(), &Scaling::None);

    // Dequantised weights are plausible trained values: finite, centred, small, and the
    // Q4_1 block structure is visible (each block spans at most 15 steps of its scale).
    for name in [
        "blk.0.attn_q.weight",
        "token_embd.weight",
        "blk.0.attn_norm.weight",
    ] {
        let x = file.tensor_f32(name).unwrap();
        assert_eq!(
            x.len() as u64,
            file.header().tensor(name).unwrap().n_elements()
        );
        assert!(x.iter().all(|v| v.is_finite()), "{name}");
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
        let rms = (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
        assert!(rms > 1e-3 && rms < 10.0, "{name}: rms {rms}");
        if name != "blk.0.attn_norm.weight" {
            assert!(
                mean.abs() < 0.1 * rms + 1e-3,
                "{name}: mean {mean}, rms {rms}"
            );
        }
    }
    // gguf-py's dequantisation of the same tensors (tools/make_gguf_fixtures.py).
    let text = std::fs::read_to_string(data("smollm2_reference.json")).unwrap();
    let reference: Json = serde_json::from_str(&text).unwrap();
    for (name, r) in reference.as_object().unwrap() {
        let info = file.header().tensor(name).unwrap();
        assert_eq!(info.ggml_type().name(), r["type"], "{name}");
        let x = file.tensor_f32(name).unwrap();
        assert_eq!(x.len() as u64, r["n"], "{name}");
        for (i, want) in r["head"].as_array().unwrap().iter().enumerate() {
            assert_eq!(x[i], want.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
        let sum_sq: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum();
        for (got, key) in [(sum, "sum"), (sum_sq, "sum_sq")] {
            let want = r[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{name} {key}: {got} vs {want}"
            );
        }
    }
    let raw = file.tensor_bytes("blk.0.attn_q.weight").unwrap();
    let x = file.tensor_f32("blk.0.attn_q.weight").unwrap();
    for (b, block) in raw.chunks_exact(20).zip(x.chunks_exact(32)).take(1000) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        if d == 0.0 {
            continue;
        }
        for &v in block {
            let q = ((v - m) / d).round();
            assert!((0.0..=15.0).contains(&q), "nibble {q}");
        }
    }
}
