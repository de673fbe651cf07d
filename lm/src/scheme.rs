//! Context-extension schemes as the evaluations read them: a frequency scheme
//! ([`Freq`]), a relative-position map ([`Map`]) and log-n, turned into the [`Plan`] of
//! a prefill of `L` tokens ([`Spec::plan`]) or into the settings of a decode cache
//! ([`Spec::decode`]) for a model trained at `L_train`, with extension `s = L / L_train`.
//!
//! Every length-dependent parameter follows its source's recommendation for the target
//! length: PI, NTK-aware, NTK-mixed and YaRN by `s` (YaRN with `L0 = L_train`, attention
//! factor `0.1 ln s + 1`), dynamic NTK refreshed at powers of two, Leaky ReRoPE's `k` from
//! [`leak_for_target`] (largest position `L_train - 1`), Self-Extend from
//! [`self_extend_for`] (neighbour window `L_train / 4`, the smallest group keeping every
//! position below `L_train`), DCA from [`dca_for`] (`chunk = 3 L_train / 4`,
//! `local = L_train / 8`).
//!
//! Schemes are named by keys ([`Spec::parse`]): `rope`, `pi`, `ntk`, `ntk-mixed`,
//! `dynamic`, `yarn`, `rerope-wN`, `leaky-wN`, `self-extend`, `dca`, `dca-scaled` (with
//! ChunkLlama's logit scale), `streaming`, each optionally followed by `-logn`.
//!
//! ```
//! use ropex_lm::scheme::{Map, Spec};
//! let spec = Spec::parse("rerope-w2048-logn")?;
//! assert_eq!(spec.map, Map::ReRope(2048));
//! assert!(spec.log_n);
//! # Ok::<(), ropex_lm::ModelError>(())
//! ```

use ropex::attention::{Attention, RefreshPolicy};
use ropex::position::{dca_for, leak_for_target, self_extend_for};
use ropex::{Frequencies, Layout, PositionMap, RopeConfig, Scaling, Yarn};

use crate::error::{ModelError, Result};
use crate::plan::Plan;

/// NTK-mixed exponent (Su, post 11).
pub const NTK_MIXED_B: f64 = 0.625;

/// StreamingLLM's attention sinks (Xiao et al. use 4).
pub const STREAMING_SINKS: usize = 4;

/// Which frequencies a scheme uses at extension `s = L / L_train`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Freq {
    /// Plain RoPE.
    Plain,
    /// Position interpolation by `s`.
    Pi,
    /// NTK-aware base change by `s`.
    NtkAware,
    /// NTK-mixed by `s` with `b = 0.625`.
    NtkMixed,
    /// Dynamic NTK (transformers `dynamic`, factor 1, `L0 = L_train`): NTK-aware at the
    /// current sequence length, refreshed (keys re-rotated) when the length passes a
    /// power of two, as ropex's decode cache does with [`RefreshPolicy::PowerOfTwo`].
    Dynamic,
    /// YaRN by `s` with `L0 = L_train` (attention factor `0.1 ln s + 1`).
    Yarn,
}

/// Which relative-position map a scheme uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Map {
    /// `P = i - j`.
    Rope,
    /// ReRoPE with this window.
    ReRope(usize),
    /// Leaky ReRoPE with this window and `k` from the target length
    /// ([`leak_for_target`]).
    Leaky(usize),
    /// Self-Extend with LongLM's recommendation for the target length
    /// ([`self_extend_for`]).
    SelfExtend,
    /// Dual Chunk Attention with ChunkLlama's recommendation ([`dca_for`]); with or
    /// without its logit scale `(0.05 ln(L / L_train) + 1)^2`.
    Dca {
        /// ChunkLlama's length-dependent logit scale.
        logit_scale: bool,
    },
    /// StreamingLLM with this many attention sinks and the window `L_train - sinks`, so
    /// that every position stays inside the trained range.
    Streaming(usize),
}

/// One scheme: frequencies, map, log-n.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// Frequencies.
    pub freq: Freq,
    /// Position map.
    pub map: Map,
    /// Log-n query scaling `max(1, ln(i + 1) / ln L_train)` with the training length.
    pub log_n: bool,
}

/// What a decode cache needs to follow a scheme at a target length: a rope config with
/// the scheme's scaling, the map, and the optional query and logit scalings (by the
/// training length).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeSpec {
    /// The model's rope with the scheme's [`Scaling`].
    pub config: RopeConfig,
    /// The position map for the target length.
    pub map: PositionMap,
    /// Log-n with this training length.
    pub log_n: Option<usize>,
    /// DCA's logit scale with this training length.
    pub dca_logit_scale: Option<usize>,
    /// The refresh policy of a length-dependent scaling (dynamic NTK).
    pub refresh: Option<RefreshPolicy>,
}

impl Spec {
    /// Parses a scheme key (see the module docs); unknown keys and zero windows are
    /// errors listing what is allowed.
    pub fn parse(key: &str) -> Result<Spec> {
        let (base, log_n) = match key.strip_suffix("-logn") {
            Some(b) => (b, true),
            None => (key, false),
        };
        let window = |w: &str| -> Result<usize> {
            w.parse::<usize>().ok().filter(|&w| w > 0).ok_or_else(|| {
                ModelError::Input(format!(
                    "scheme '{key}': the window must be a positive integer, got '{w}'"
                ))
            })
        };
        let (freq, map) = match base {
            "rope" => (Freq::Plain, Map::Rope),
            "pi" => (Freq::Pi, Map::Rope),
            "ntk" => (Freq::NtkAware, Map::Rope),
            "ntk-mixed" => (Freq::NtkMixed, Map::Rope),
            "dynamic" => (Freq::Dynamic, Map::Rope),
            "yarn" => (Freq::Yarn, Map::Rope),
            "self-extend" => (Freq::Plain, Map::SelfExtend),
            "dca" => (Freq::Plain, Map::Dca { logit_scale: false }),
            "dca-scaled" => (Freq::Plain, Map::Dca { logit_scale: true }),
            "streaming" => (Freq::Plain, Map::Streaming(STREAMING_SINKS)),
            b => match (b.strip_prefix("rerope-w"), b.strip_prefix("leaky-w")) {
                (Some(w), _) => (Freq::Plain, Map::ReRope(window(w)?)),
                (_, Some(w)) => (Freq::Plain, Map::Leaky(window(w)?)),
                _ => {
                    return Err(ModelError::Input(format!(
                        "unknown scheme '{key}'; allowed: rope, pi, ntk, ntk-mixed, dynamic, \
                         yarn, rerope-wN, leaky-wN, self-extend, dca, dca-scaled, streaming, \
                         each optionally with the suffix -logn"
                    )));
                }
            },
        };
        Ok(Spec { freq, map, log_n })
    }

    /// The position map at a window of `len` tokens for a model trained at `train_len`,
    /// canonical where a map coincides with plain RoPE (a window at least `len`, a leak of 1, a Self-Extend group
    /// of 1, a DCA chunk or StreamingLLM cache holding every key), so that equal plans
    /// compare equal and are computed once.
    pub fn position_map(&self, train_len: usize, len: usize) -> Result<PositionMap> {
        Ok(match self.map {
            Map::Rope => PositionMap::Rope,
            // Every distance of a window of `len` tokens is below `len`: a window `w >= len`
            // leaves all of them in the band, where ReRoPE and Leaky ReRoPE are RoPE.
            Map::ReRope(w) | Map::Leaky(w) if w >= len => {
                PositionMap::rerope(w)?;
                PositionMap::Rope
            }
            Map::ReRope(w) => PositionMap::rerope(w)?,
            Map::Leaky(w) => {
                let k = leak_for_target(w, train_len, len)?;
                if k == 1.0 {
                    PositionMap::Rope
                } else {
                    PositionMap::leaky_rerope(w, k)?
                }
            }
            Map::SelfExtend => match self_extend_for(train_len, len)? {
                PositionMap::SelfExtend { group: 1, .. } => PositionMap::Rope,
                map => map,
            },
            Map::Dca { .. } => match dca_for(train_len)? {
                PositionMap::DualChunk {
                    chunk_size,
                    local_window,
                } if chunk_size - local_window >= len => PositionMap::Rope,
                map => map,
            },
            Map::Streaming(sinks) => {
                let window = train_len
                    .checked_sub(sinks)
                    .filter(|&w| w > 0)
                    .ok_or_else(|| {
                        ModelError::Input(format!(
                            "StreamingLLM with {sinks} sinks needs a training length above \
                             {sinks}, got {train_len}"
                        ))
                    })?;
                if sinks + window >= len {
                    PositionMap::Rope
                } else {
                    PositionMap::streaming(sinks, window)?
                }
            }
        })
    }

    /// The static scaling at `len` (dynamic NTK: the refreshed `Scaling::dynamic(1,
    /// L_train)`); `Scaling::None` up to the training length.
    pub fn scaling(&self, train_len: usize, len: usize) -> Scaling {
        let s = (len as f64 / train_len as f64).max(1.0);
        if s == 1.0 {
            return Scaling::None;
        }
        match self.freq {
            Freq::Plain => Scaling::None,
            Freq::Pi => Scaling::linear(s),
            Freq::NtkAware => Scaling::ntk_aware(s),
            Freq::NtkMixed => Scaling::ntk_mixed(s, NTK_MIXED_B),
            Freq::Yarn => Scaling::Yarn(Yarn::new(s, train_len)),
            Freq::Dynamic => Scaling::dynamic(1.0, train_len),
        }
    }

    /// The attention plan of a causal prefill of `len` tokens for a model with rope
    /// `rope` (its own scaling ignored) and `layout`, trained at `train_len`. Log-n and
    /// DCA's logit scale are applied only past the training length (they are the
    /// identity below it), so plans of coinciding schemes compare equal.
    pub fn plan(
        &self,
        rope: &RopeConfig,
        layout: Layout,
        train_len: usize,
        len: usize,
    ) -> Result<Plan> {
        let map = self.position_map(train_len, len)?;
        let log_n = self.log_n && len > train_len;
        let dca_scale = matches!(self.map, Map::Dca { logit_scale: true }) && len > train_len;
        let attention = |freqs: Frequencies| -> Result<Attention> {
            let mut att = Attention::new(freqs, layout, map);
            if log_n {
                att = att.with_log_n(train_len)?;
            }
            if dca_scale {
                att = att.with_dca_logit_scale(train_len)?;
            }
            Ok(att)
        };
        let rope = rope.clone().with_scaling(self.scaling(train_len, len))?;
        if self.freq == Freq::Dynamic && len > train_len {
            return Plan::refreshed(&rope, RefreshPolicy::PowerOfTwo, len, attention);
        }
        Ok(Plan::Single(attention(rope.frequencies_for_len(len))?))
    }

    /// The decode-cache settings that follow this scheme for a sequence growing to
    /// `target_len` tokens (the map and static scaling chosen for `target_len`).
    pub fn decode(
        &self,
        rope: &RopeConfig,
        train_len: usize,
        target_len: usize,
    ) -> Result<DecodeSpec> {
        let long = target_len > train_len;
        Ok(DecodeSpec {
            config: rope
                .clone()
                .with_scaling(self.scaling(train_len, target_len))?,
            map: self.position_map(train_len, target_len)?,
            log_n: (self.log_n && long).then_some(train_len),
            dca_logit_scale: (matches!(self.map, Map::Dca { logit_scale: true }) && long)
                .then_some(train_len),
            refresh: (self.freq == Freq::Dynamic).then_some(RefreshPolicy::PowerOfTwo),
        })
    }

    /// A label for tables and plots, e.g. `ReRoPE w=2048 + log-n`.
    pub fn label(&self, train_len: usize) -> String {
        let map = match self.map {
            Map::Rope => match self.freq {
                Freq::Plain => "RoPE".to_string(),
                Freq::Pi => "PI".into(),
                Freq::NtkAware => "NTK-aware".into(),
                Freq::NtkMixed => format!("NTK-mixed b={NTK_MIXED_B}"),
                Freq::Dynamic => "dynamic NTK".into(),
                Freq::Yarn => "YaRN".into(),
            },
            Map::ReRope(w) => format!("ReRoPE w={w}"),
            Map::Leaky(w) => format!("Leaky ReRoPE w={w}, k(L)"),
            Map::SelfExtend => format!("Self-Extend W={}, G(L)", train_len / 4),
            Map::Dca { logit_scale } => {
                let scaled = if logit_scale { ", logit scale" } else { "" };
                format!("DCA c={}, l={}{scaled}", 3 * train_len / 4, train_len / 8)
            }
            Map::Streaming(sinks) => format!(
                "StreamingLLM S={sinks}, W={}",
                train_len.saturating_sub(sinks)
            ),
        };
        if self.log_n {
            format!("{map} + log-n")
        } else {
            map
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope() -> RopeConfig {
        RopeConfig::new(64, 100_000.0).unwrap()
    }

    /// Keys parse to the frequencies, maps and log-n they name; bad keys are errors.
    #[test]
    fn keys_parse_to_their_schemes() {
        let cases = [
            ("rope", Freq::Plain, Map::Rope, false),
            ("pi", Freq::Pi, Map::Rope, false),
            ("ntk-logn", Freq::NtkAware, Map::Rope, true),
            ("dynamic", Freq::Dynamic, Map::Rope, false),
            ("yarn", Freq::Yarn, Map::Rope, false),
            ("rerope-w4096-logn", Freq::Plain, Map::ReRope(4096), true),
            ("leaky-w2048", Freq::Plain, Map::Leaky(2048), false),
            ("self-extend", Freq::Plain, Map::SelfExtend, false),
            (
                "dca-scaled",
                Freq::Plain,
                Map::Dca { logit_scale: true },
                false,
            ),
        ];
        for (key, freq, map, log_n) in cases {
            assert_eq!(
                Spec::parse(key).unwrap(),
                Spec { freq, map, log_n },
                "{key}"
            );
        }
        for bad in [
            "",
            "rerope-w0",
            "rerope-wx",
            "leaky",
            "yarn-2",
            "rope-logn-logn",
        ] {
            assert!(Spec::parse(bad).is_err(), "{bad}");
        }
    }

    /// At 16k for an 8k model: YaRN's frequencies are `Yarn::new(2, 8192)`'s, Leaky's `k`
    /// puts its largest position at 8191, Self-Extend and DCA are the recommended maps,
    /// log-n is on, and dynamic NTK is two segments (RoPE to 8192, then NTK by 2).
    /// At 8k every frequency scheme is plain RoPE and so are Leaky and Self-Extend.
    #[test]
    fn plans_follow_the_recommendations() {
        let (r, lay) = (rope(), Layout::Interleaved);
        let plain = Spec::parse("rope")
            .unwrap()
            .plan(&r, lay, 8192, 8192)
            .unwrap();
        for key in [
            "pi",
            "ntk",
            "dynamic",
            "yarn",
            "leaky-w2048",
            "self-extend",
            "rope-logn",
        ] {
            let p = Spec::parse(key).unwrap().plan(&r, lay, 8192, 8192).unwrap();
            assert_eq!(p, plain, "{key} at the training length");
        }
        // DCA's chunks (6144, local 1024) already split an 8k window; only below
        // chunk - local = 5120 tokens is it plain RoPE.
        let dca = Spec::parse("dca").unwrap();
        assert_ne!(dca.plan(&r, lay, 8192, 8192).unwrap(), plain);
        let short = Spec::parse("rope")
            .unwrap()
            .plan(&r, lay, 8192, 5120)
            .unwrap();
        assert_eq!(dca.plan(&r, lay, 8192, 5120).unwrap(), short);
        let single = |key: &str| match Spec::parse(key)
            .unwrap()
            .plan(&r, lay, 8192, 16384)
            .unwrap()
        {
            Plan::Single(a) => a,
            p => panic!("{key}: {p:?}"),
        };
        let yarn = r
            .clone()
            .with_scaling(Scaling::Yarn(Yarn::new(2.0, 8192)))
            .unwrap();
        assert_eq!(
            single("yarn"),
            Attention::new(yarn.frequencies(), lay, PositionMap::Rope)
        );
        let leaky = single("leaky-w2048");
        assert!((leaky.map().max_position(16384) - 8191.0).abs() < 1e-9);
        assert_eq!(
            *single("self-extend").map(),
            self_extend_for(8192, 16384).unwrap()
        );
        assert_eq!(*single("dca").map(), dca_for(8192).unwrap());
        assert_ne!(single("rerope-w2048-logn"), single("rerope-w2048"));
        let rerope = Spec::parse("rerope-w2048").unwrap();
        assert_eq!(
            rerope.plan(&r, lay, 8192, 2048).unwrap(),
            Spec::parse("rope")
                .unwrap()
                .plan(&r, lay, 8192, 2048)
                .unwrap()
        );
        match Spec::parse("dynamic")
            .unwrap()
            .plan(&r, lay, 8192, 16384)
            .unwrap()
        {
            Plan::Segments(s) => {
                assert_eq!(s.len(), 2);
                assert_eq!(s[0].queries, 0..8192);
                assert_eq!(s[1].queries, 8192..16384);
            }
            p => panic!("dynamic: {p:?}"),
        }
        let d = Spec::parse("dca-scaled-logn")
            .unwrap()
            .decode(&r, 8192, 16384)
            .unwrap();
        assert_eq!(
            (d.log_n, d.dca_logit_scale, d.map),
            (Some(8192), Some(8192), dca_for(8192).unwrap())
        );
    }
}
