//! [`GgufRope`]: ropex's [`RopeConfig`] and [`Layout`] from the rope keys and tensors
//! llama.cpp writes into a GGUF file.

use std::f64::consts::PI;

use crate::error::{Result, RopeError};
use crate::gguf::Gguf;
use crate::gguf::value::Value;
use crate::rotary::Layout;
use crate::scaling::{Llama3, LongRope, RopeConfig, Scaling, Yarn};

pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";
pub(crate) const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
pub(crate) const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";

/// The rope tensors a file may carry, dequantised.
pub(crate) struct RopeTensors<'a> {
    pub freqs: Option<&'a [f32]>,
    pub long: Option<&'a [f32]>,
    pub short: Option<&'a [f32]>,
}

/// How llama.cpp rotates the heads of an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayoutKind {
    /// ggml's "normal" rope: pairs of adjacent dims `(2j, 2j+1)` ([`Layout::Interleaved`]).
    /// llama.cpp's converter permutes the Q and K rows of Llama-family checkpoints so that
    /// the pairs Hugging Face rotates with `rotate_half` become adjacent.
    Normal,
    /// ggml's NeoX rope: dims `(j, j + n_rot/2)` ([`Layout::Half`]), weights unpermuted.
    Neox,
    /// The architecture uses no rotary embedding.
    NoRope,
    /// Multimodal rope with per-section positions (M-RoPE), which ropex does not model.
    Multimodal,
}

/// llama.cpp's rope type of GGUF architecture `arch` (`general.architecture`), as its
/// `llama_model_rope_type` table assigns it; `None` for a name the table does not list.
///
/// Architectures whose rope type depends on the file (`glm4`, `glm4moe`, `hunyuan_vl`)
/// are listed with their text-only type; a file with `{arch}.rope.dimension_sections`
/// is multimodal whatever its architecture.
pub fn rope_layout_kind(arch: &str) -> Option<RopeLayoutKind> {
    use RopeLayoutKind::*;
    const NORMAL: &[&str] = &[
        "llama",
        "llada",
        "llama4",
        "deci",
        "baichuan",
        "starcoder",
        "internlm2",
        "minicpm",
        "xverse",
        "command-r",
        "cohere2",
        "olmo",
        "arctic",
        "deepseek",
        "deepseek2",
        "deepseek2-ocr",
        "plm",
        "chatglm",
        "granite",
        "granitemoe",
        "granitehybrid",
        "chameleon",
        "bailingmoe",
        "neo-bert",
        "smollm3",
        "arcee",
        "ernie4_5",
        "ernie4_5-moe",
        "mistral3",
        "mistral4",
        "llama-embed",
        "maincoder",
        "glm-dsa",
        "glm4",
    ];
    const NEOX: &[&str] = &[
        "falcon",
        "falcon-h1",
        "grok",
        "dbrx",
        "bert",
        "jina-bert-v3",
        "modern-bert",
        "nomic-bert",
        "nomic-bert-moe",
        "eurobert",
        "stablelm",
        "bitnet",
        "qwen",
        "qwen2",
        "dream",
        "qwen2moe",
        "qwen3",
        "qwen3moe",
        "qwen3next",
        "llada-moe",
        "rnd1",
        "olmo2",
        "olmoe",
        "phi2",
        "phi3",
        "phimoe",
        "plamo",
        "plamo2",
        "plamo3",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3n",
        "gemma4",
        "gemma-embedding",
        "starcoder2",
        "openelm",
        "gptneox",
        "codeshell",
        "orion",
        "nemotron",
        "exaone",
        "exaone4",
        "exaone-moe",
        "minicpm3",
        "bailingmoe2",
        "dots1",
        "hunyuan-moe",
        "hunyuan-dense",
        "hunyuan_vl",
        "jais2",
        "gpt-oss",
        "lfm2",
        "lfm2moe",
        "smallthinker",
        "seed_oss",
        "grovemoe",
        "apertus",
        "minimax-m2",
        "cogvlm",
        "pangu-embedded",
        "afmoe",
        "mimo2",
        "step35",
        "glm4moe",
    ];
    const NONE: &[&str] = &[
        "clip",
        "gpt2",
        "gptj",
        "mpt",
        "refact",
        "bloom",
        "mamba",
        "mamba2",
        "jamba",
        "jina-bert-v2",
        "t5",
        "t5encoder",
        "jais",
        "rwkv6",
        "rwkv6qwen2",
        "rwkv7",
        "arwkv7",
        "wavtokenizer-dec",
        "nemotron_h",
        "nemotron_h_moe",
        "kimi-linear",
    ];
    const MULTIMODAL: &[&str] = &[
        "qwen2vl",
        "qwen3vl",
        "qwen3vlmoe",
        "qwen35",
        "qwen35moe",
        "paddleocr",
    ];
    [
        (NORMAL, Normal),
        (NEOX, Neox),
        (NONE, NoRope),
        (MULTIMODAL, Multimodal),
    ]
    .into_iter()
    .find(|(names, _)| names.contains(&arch))
    .map(|(_, kind)| kind)
}

/// The rotary embedding of a GGUF model, in ropex's terms.
///
/// Derived from the keys llama.cpp writes (`{arch}` is `general.architecture`):
///
/// - **Dims.** `head_dim` = `{arch}.attention.key_length`, else
///   `{arch}.embedding_length / {arch}.attention.head_count` (the first entry when
///   per-layer); the rotary dim is `{arch}.rope.dimension_count`, else `head_dim`.
/// - **Base** `{arch}.rope.freq_base`, default 10000.
/// - **Layout** from the architecture ([`rope_layout_kind`]): Llama-family files rotate
///   adjacent pairs ([`Layout::Interleaved`]) because llama.cpp's converter permuted the
///   Q/K rows; NeoX-style architectures (qwen2, phi3, gemma, falcon, ...) rotate halves.
/// - **Scheme** from `{arch}.rope.scaling.type` (llama.cpp's default `linear`) and
///   `.factor` (absent or 0 means 1): `none` or a factor of 1 is plain RoPE, `linear`
///   is position interpolation, `yarn` is [`Yarn`] with `L0` =
///   `.original_context_length` (else `{arch}.context_length`), betas
///   `.yarn_beta_fast` / `.yarn_beta_slow` (32 / 1), and the attention factor
///   `.yarn_attn_factor` (where the converter stores transformers' `attention_factor`),
///   or with `.yarn_log_multiplier = l` llama.cpp's `m(s, mscale) / m(s, l)` with
///   `mscale = l` for `deepseek2` and 1 otherwise, else `0.1 ln s + 1`; a
///   `.attn_factor` multiplies it. `longrope`, or no scaling type with
///   `rope_factors_long` / `rope_factors_short` tensors (Phi-3's converter), is
///   [`LongRope`] from those tensors with `L0` = `.original_context_length`,
///   `s = context_length / L0` and the attention factor `.attn_factor` (read as
///   transformers' default when it equals it to f32 precision).
/// - **`rope_freqs`** (Llama 3.1 and later): per-pair divisors `inv_j = theta_j / f_j`.
///   When they are Llama 3's wavelength bands (checked pair by pair within 1e-5 of the
///   converter's formula, with `L0` = `.original_context_length` or the converter's
///   default 8192 and `low` / `high` fitted to the ramp), the scheme is [`Llama3`] with
///   those parameters, so frequencies equal the config.json path's exactly; other
///   divisors, or divisors with an `.attn_factor` (a YaRN ramp baked into the tensor),
///   become a [`LongRope`] whose short and long factors are both `f` and whose
///   attention factor is `.attn_factor` (default 1): the same `theta_j / f_j` and
///   magnitude as llama.cpp.
///
/// Floats are stored as f32 in GGUF; ropex widens each through its shortest decimal
/// form (`0.1f32` becomes `0.1`), which recovers the decimal a converter wrote from
/// config.json for every value of up to 7 significant digits.
///
/// YaRN with `yarn_ext_factor = 0` has no ramp and no magnitude scaling in ggml: it is
/// read as linear interpolation.
///
/// What ropex cannot represent is a [`RopeError::GgufUnsupported`]: YaRN with a
/// `yarn_ext_factor` strictly between 0 and 1 or above 1, an `attn_factor`
/// other than 1 on plain or linear RoPE without rope tensors, `rope_freqs` combined with
/// a scaling type, factor tensors with a scaling type other than `longrope`,
/// architectures without rope or with multimodal rope sections, and architectures
/// missing from the table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufRope {
    /// `general.architecture`.
    pub arch: String,
    /// Head dim, rotary dim, base and frequency scheme.
    pub config: RopeConfig,
    /// Which dims form a rotation pair in this file's Q/K weights.
    pub layout: Layout,
    /// `{arch}.context_length`: the context the model is meant to be used at.
    pub context_len: Option<usize>,
    /// The pretraining length a scaled scheme extends from
    /// (`.original_context_length`, or the `L0` of a recognised Llama 3 scheme).
    pub original_context_len: Option<usize>,
    /// The scheme as the file states it: `none`, `linear`, `yarn`, `longrope`, or
    /// `rope_freqs` for a divisor tensor.
    pub scaling_type: String,
    /// How ambiguous or lossy parts of the file were read. Never errors.
    pub notes: Vec<String>,
}

impl GgufRope {
    /// The rotary embedding of the GGUF file at `path`: [`GgufFile::open`] then
    /// [`GgufFile::rope`].
    ///
    /// [`GgufFile::open`]: crate::gguf::GgufFile::open
    /// [`GgufFile::rope`]: crate::gguf::GgufFile::rope
    pub fn from_path(path: impl AsRef<std::path::Path>) -> Result<GgufRope> {
        crate::gguf::GgufFile::open(path)?.rope()
    }

    /// The training length to explain a scheme against: the original length when the
    /// file names one, else the context length.
    pub fn train_len(&self) -> Option<usize> {
        self.original_context_len.or(self.context_len)
    }

    pub(crate) fn from_header(g: &Gguf, t: RopeTensors<'_>) -> Result<GgufRope> {
        let arch = g.architecture()?.to_string();
        let k = Keys { g, arch: &arch };
        let unsupported = |what: String, allowed: &str| RopeError::GgufUnsupported {
            what,
            allowed: allowed.into(),
        };
        if g.get(&k.key("rope.dimension_sections")).is_some() {
            return Err(unsupported(
                format!("multimodal rope sections ({arch}.rope.dimension_sections)"),
                "text rope with one position per token",
            ));
        }
        let layout = match rope_layout_kind(&arch) {
            Some(RopeLayoutKind::Normal) => Layout::Interleaved,
            Some(RopeLayoutKind::Neox) => Layout::Half,
            Some(RopeLayoutKind::NoRope) => {
                return Err(unsupported(
                    format!("architecture '{arch}', which uses no rotary embedding"),
                    "an architecture with rotary embeddings",
                ));
            }
            Some(RopeLayoutKind::Multimodal) => {
                return Err(unsupported(
                    format!("architecture '{arch}' with multimodal rope (M-RoPE)"),
                    "text rope with one position per token",
                ));
            }
            None => {
                return Err(unsupported(
                    format!("architecture '{arch}'"),
                    "an architecture in llama.cpp's rope table (llama, qwen2, phi3, gemma, ...)",
                ));
            }
        };

        let head_dim = match k.uint("attention.key_length")? {
            Some(d) => d,
            None => match (k.uint("embedding_length")?, k.uint("attention.head_count")?) {
                (Some(e), Some(h)) if h > 0 => e / h,
                _ => {
                    return Err(RopeError::MissingKey {
                        key: k.key("attention.key_length"),
                        context: format!(
                            "GGUF metadata (or {arch}.embedding_length and {arch}.attention.head_count)"
                        ),
                    });
                }
            },
        };
        let rot = k.uint("rope.dimension_count")?.unwrap_or(head_dim);
        let base = k.float("rope.freq_base")?.unwrap_or(10_000.0);
        let context_len = k.uint("context_length")?;
        let mut config = RopeConfig::new(head_dim, base)?;
        if rot != head_dim {
            config = config.with_rotary_dim(rot)?;
        }
        let pairs = config.rotary_dim() / 2;
        let mut notes = Vec::new();
        for suffix in ["rope.freq_base_swa", "rope.dimension_count_swa"] {
            if let Some(v) = g.get(&k.key(suffix)) {
                notes.push(format!(
                    "{} = {v:?}: sliding-window layers rotate differently; this config describes the full-attention layers",
                    k.key(suffix)
                ));
            }
        }

        let stated = k.string("rope.scaling.type")?;
        let ty = stated.unwrap_or("linear");
        let factor = match k.float("rope.scaling.factor")? {
            Some(f) => Some(f),
            None => k.float("rope.scale_linear")?,
        }
        .filter(|&f| f != 0.0)
        .unwrap_or(1.0);
        let original = k.uint("rope.scaling.original_context_length")?;
        let attn_factor = k.float("rope.scaling.attn_factor")?;
        let mut original_context_len = original;

        let factor_tensors = t.long.is_some() || t.short.is_some();
        if t.freqs.is_some() && factor_tensors {
            return Err(unsupported(
                "both a rope_freqs tensor and rope_factors_long/short tensors".into(),
                "one of them",
            ));
        }
        // Phi-3's converter writes LongRoPE as the two factor tensors and no scaling type.
        let ty = if factor_tensors && stated.is_none() {
            "longrope"
        } else {
            ty
        };
        let mut scaling = match ty {
            "none" => Scaling::None,
            "linear" if factor == 1.0 => Scaling::None,
            "linear" => Scaling::linear(factor),
            // ggml's YaRN with no extrapolation mix is plain interpolation without mscale.
            "yarn" if k.float("rope.scaling.yarn_ext_factor")? == Some(0.0) => {
                notes.push("yarn with yarn_ext_factor 0 is linear interpolation".into());
                Scaling::linear(factor)
            }
            "yarn" => {
                let l0 = original
                    .or(context_len)
                    .ok_or_else(|| RopeError::MissingKey {
                        key: k.key("rope.scaling.original_context_length"),
                        context: format!("GGUF yarn scaling (or {arch}.context_length)"),
                    })?;
                original_context_len = Some(l0);
                Scaling::Yarn(k.yarn(factor, l0, attn_factor)?)
            }
            "longrope" => Scaling::LongRope(longrope(&k, &t, original, context_len, attn_factor)?),
            other => {
                return Err(unsupported(
                    format!("rope scaling type '{other}'"),
                    "none, linear, yarn or longrope",
                ));
            }
        };
        if factor_tensors && !matches!(scaling, Scaling::LongRope(_)) {
            return Err(unsupported(
                format!("rope_factors_long/short tensors with rope scaling '{ty}'"),
                "longrope, or no scaling type (Phi-3's convention)",
            ));
        }

        let mut scaling_type = if scaling == Scaling::None { "none" } else { ty }.to_string();
        if let Some(divisors) = t.freqs {
            if scaling != Scaling::None {
                return Err(unsupported(
                    format!(
                        "rope_freqs tensor combined with rope scaling '{ty}' (factor {factor})"
                    ),
                    "rope_freqs alone (Llama 3 style) or a scaling type without it",
                ));
            }
            if divisors.len() != pairs {
                return Err(RopeError::shape(
                    "GGUF tensor 'rope_freqs.weight'",
                    format!("{pairs} values (rotary dim / 2)"),
                    format!("{} values", divisors.len()),
                ));
            }
            let divisors = widen_all(divisors);
            let theta = config.frequencies().inv_freq().to_vec();
            let l0 = original.unwrap_or(LLAMA3_DEFAULT_L0);
            // Llama 3 has no attention factor: with one, only the divisor form fits.
            let attn = attn_factor.filter(|&a| a != 1.0);
            let llama3 = match attn {
                None => match_llama3(&divisors, &theta, l0),
                Some(_) => None,
            };
            scaling_type = "rope_freqs".into();
            scaling = match llama3 {
                Some(l) => {
                    notes.push(format!(
                        "rope_freqs matches Llama 3 bands: factor {}, low_freq_factor {}, high_freq_factor {}, original length {l0}",
                        l.factor, l.low_freq_factor, l.high_freq_factor
                    ));
                    original_context_len = Some(l0);
                    Scaling::Llama3(l)
                }
                None => {
                    notes.push(format!(
                        "rope_freqs used as per-pair divisors (a LongRoPE with equal short and long factors), attention factor {}",
                        attn.unwrap_or(1.0)
                    ));
                    Scaling::LongRope(LongRope {
                        short_factor: divisors.clone(),
                        long_factor: divisors,
                        original_max_position_embeddings: original.or(context_len).unwrap_or(1),
                        factor: 1.0,
                        attention_factor: Some(attn.unwrap_or(1.0)),
                    })
                }
            };
        } else if let Some(a) = attn_factor
            && a != 1.0
            && matches!(scaling, Scaling::None | Scaling::Linear { .. })
        {
            return Err(unsupported(
                format!("{arch}.rope.scaling.attn_factor = {a} with rope scaling '{ty}'"),
                "an attention factor of 1 for plain and linear RoPE (ropex scales attention only with yarn, longrope and rope_freqs)",
            ));
        }
        let config = config.with_scaling_lenient(scaling)?;
        Ok(GgufRope {
            arch,
            config,
            layout,
            context_len,
            original_context_len,
            scaling_type,
            notes,
        })
    }
}

/// LongRoPE from the `rope_factors_long` / `rope_factors_short` tensors.
///
/// `s = context_length / L0` as transformers derives it. The converter stores the
/// attention factor it computed, `sqrt(1 + ln s / ln L0)`, as an f32; a stored value
/// equal to that default within 1e-6 is read as the default (so it is exact), any other
/// value is kept.
fn longrope(
    k: &Keys<'_>,
    t: &RopeTensors<'_>,
    original: Option<usize>,
    context_len: Option<usize>,
    attn_factor: Option<f64>,
) -> Result<LongRope> {
    let l0 = original.ok_or_else(|| RopeError::MissingKey {
        key: k.key("rope.scaling.original_context_length"),
        context: "GGUF longrope scaling".into(),
    })?;
    let factors = |list: Option<&[f32]>, name: &str| {
        list.map(widen_all).ok_or_else(|| RopeError::MissingKey {
            key: format!("tensor '{name}'"),
            context: "GGUF longrope scaling".into(),
        })
    };
    let mut rope = LongRope {
        short_factor: factors(t.short, ROPE_FACTORS_SHORT)?,
        long_factor: factors(t.long, ROPE_FACTORS_LONG)?,
        original_max_position_embeddings: l0,
        factor: context_len.map_or(1.0, |c| c as f64 / l0 as f64),
        attention_factor: None,
    };
    let default = rope.resolved_attention_factor();
    rope.attention_factor = attn_factor.filter(|&a| (a - default).abs() > 1e-6 * default);
    Ok(rope)
}

/// llama.cpp's converter's `original_max_position_embeddings` when a Llama 3 config has
/// none.
const LLAMA3_DEFAULT_L0: usize = 8192;

/// Typed access to `{arch}.*` keys.
struct Keys<'a> {
    g: &'a Gguf,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn uint(&self, suffix: &str) -> Result<Option<usize>> {
        let key = self.key(suffix);
        let Some(v) = self.g.get(&key) else {
            return Ok(None);
        };
        // Per-layer values (an array) count by their first layer, as llama.cpp does.
        let first = match v {
            Value::Array(a) => a.get(0),
            v => Some(v.clone()),
        };
        first
            .and_then(|v| v.as_u64())
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                RopeError::invalid(
                    key,
                    format!("{v:?}"),
                    "must be a non-negative integer (or a non-empty array of them)",
                )
            })
    }

    fn float(&self, suffix: &str) -> Result<Option<f64>> {
        let key = self.key(suffix);
        let Some(v) = self.g.get(&key) else {
            return Ok(None);
        };
        let x = match *v {
            Value::F32(x) => widen(x),
            Value::F64(x) => x,
            ref v => match v.as_i64() {
                Some(i) => i as f64,
                None => {
                    return Err(RopeError::invalid(
                        key,
                        format!("{v:?}"),
                        "must be a number",
                    ));
                }
            },
        };
        if !x.is_finite() {
            return Err(RopeError::invalid(key, x, "must be a finite number"));
        }
        Ok(Some(x))
    }

    fn string(&self, suffix: &str) -> Result<Option<&str>> {
        let key = self.key(suffix);
        match self.g.get(&key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(RopeError::invalid(
                key,
                format!("{v:?}"),
                "must be a string",
            )),
        }
    }

    fn yarn(&self, factor: f64, l0: usize, attn_factor: Option<f64>) -> Result<Yarn> {
        if let Some(e) = self.float("rope.scaling.yarn_ext_factor")?
            && e >= 0.0
            && e != 1.0
        {
            return Err(RopeError::GgufUnsupported {
                what: format!("{}.rope.scaling.yarn_ext_factor = {e}", self.arch),
                allowed:
                    "1 (YaRN's full ramp), 0 (linear), or unset: ropex has no partial extrapolation mix"
                        .into(),
            });
        }
        let mut y = Yarn::new(factor, l0).with_betas(
            self.float("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
            self.float("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
        );
        let log_mul = self
            .float("rope.scaling.yarn_log_multiplier")?
            .filter(|&l| l != 0.0);
        let explicit = self.float("rope.scaling.yarn_attn_factor")?;
        let base_factor = if let Some(l) = log_mul {
            let mscale = if self.arch == "deepseek2" { l } else { 1.0 };
            y = y.with_mscale(mscale, l);
            None
        } else {
            explicit
        };
        match (base_factor, attn_factor.filter(|&a| a != 1.0)) {
            (None, None) => {}
            (Some(a), None) => y = y.with_attention_factor(a),
            (base, Some(m)) => {
                let a = base.unwrap_or_else(|| y.resolved_attention_factor()) * m;
                y = y.with_attention_factor(a);
            }
        }
        Ok(y)
    }
}

/// An f32 read back as the decimal it most likely was: its shortest round-trip form.
fn widen(x: f32) -> f64 {
    if !x.is_finite() {
        return x.into();
    }
    x.to_string().parse().unwrap_or(x.into())
}

fn widen_all(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| widen(x)).collect()
}

/// The Llama 3 parameters that reproduce `divisors` (llama.cpp's `rope_freqs`), if any.
///
/// Llama 3's divisor for a pair of wavelength `lam` depends on `L0 / low` and
/// `L0 / high` only: 1 below `L0 / high`, `s` above `L0 / low`, and
/// `1 / ((1 - t) / s + t)` with `t = (L0 / lam - low) / (high - low)` in between. With
/// `L0` given, `s` is the largest divisor and `t` is linear in `1 / lam`, so `low` and
/// `high` follow from a line fit through the ramp pairs (rounded to 3 decimals, the
/// precision of published configs); Meta's `low = 1, high = 4` is the candidate when
/// the ramp has fewer than two pairs. A candidate is accepted only if it reproduces
/// every divisor within a relative 1e-5 (the f32 storage and the converter's f32
/// wavelengths differ from f64 by ~1e-7).
fn match_llama3(divisors: &[f64], theta: &[f64], l0: usize) -> Option<Llama3> {
    let s = divisors.iter().copied().fold(f64::NAN, f64::max);
    if s.is_nan() || s <= 1.0 || divisors.iter().any(|&d| !d.is_finite() || d <= 0.0) {
        return None;
    }
    let l0f = l0 as f64;
    let ramp: Vec<(f64, f64)> = divisors
        .iter()
        .zip(theta)
        .filter(|&(&d, _)| d > 1.0 + 1e-6 && d < s * (1.0 - 1e-6))
        .map(|(&d, &th)| (th / (2.0 * PI), (1.0 / d - 1.0 / s) / (1.0 - 1.0 / s)))
        .collect();
    let mut candidates = Vec::new();
    if ramp.len() >= 2 {
        let n = ramp.len() as f64;
        let (mx, my) = ramp
            .iter()
            .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x / n, b + y / n));
        let sxx: f64 = ramp.iter().map(|&(x, _)| (x - mx) * (x - mx)).sum();
        let sxy: f64 = ramp.iter().map(|&(x, y)| (x - mx) * (y - my)).sum();
        if sxx > 0.0 {
            let a = sxy / sxx;
            let b = my - a * mx;
            if a > 0.0 {
                let width = l0f / a;
                let low = -b * width;
                let round = |v: f64| (v * 1000.0).round() / 1000.0;
                candidates.push((round(low), round(low + width)));
                candidates.push((low, low + width));
            }
        }
    }
    candidates.push((1.0, 4.0));
    candidates.into_iter().find_map(|(low, high)| {
        if !(low > 0.0 && high > low) {
            return None;
        }
        let fits = divisors.iter().zip(theta).all(|(&d, &th)| {
            let lam = 2.0 * PI / th;
            let want = if lam < l0f / high {
                1.0
            } else if lam > l0f / low {
                s
            } else {
                let t = (l0f / lam - low) / (high - low);
                1.0 / ((1.0 - t) / s + t)
            };
            (want - d).abs() <= 1e-5 * want
        });
        fits.then_some(Llama3 {
            factor: s,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: l0,
        })
    })
}
