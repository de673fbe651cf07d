//! Schemes and Su's evaluation protocol: at every context length, score the same final
//! bytes (the last `train_len` bytes of each window) over fixed window end points shared
//! by every length and scheme, so the columns are comparable.

use std::time::Instant;

use ropex::PositionMap;
use ropex::attention::Attention;
use ropex::position::dca_for;
use ropex_lm::scheme::Spec;
use ropex_lm::{ModelError, Plan, Result, TinyLm, nll_rows};

use ropex_lm::progress::Progress;

pub use ropex_lm::scheme::{Freq, Map, NTK_MIXED_B, STREAMING_SINKS};

/// Which checkpoint a scheme reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// The plain-RoPE-trained model (`--model`).
    Main,
    /// The inverse-Leaky-trained model (`--inv-leaky-model`), read with plain RoPE.
    InvLeaky,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheme {
    /// Name on the command line (`--schemes`) and in JSON.
    pub key: String,
    /// Name in the table and the plot.
    pub label: String,
    /// Frequencies.
    pub freq: Freq,
    /// Position map.
    pub map: Map,
    /// Log-n query scaling with the training length.
    pub log_n: bool,
    /// Which checkpoint.
    pub checkpoint: Checkpoint,
    /// Part of `--quick`.
    pub quick: bool,
    /// Its loss per position is recorded at 16x (the per-position plot).
    pub per_position: bool,
}

/// Every scheme, in table order: each of RoPE, PI, NTK-aware, NTK-mixed, dynamic NTK,
/// YaRN, ReRoPE (w = L/4 and L/2), Leaky ReRoPE (w = L/2), Self-Extend, DCA (without and
/// with its logit scale) and StreamingLLM without and with log-n, then the
/// inverse-Leaky-trained checkpoint under plain RoPE.
pub fn catalogue(train_len: usize) -> Vec<Scheme> {
    let (w4, w2) = ((train_len / 4).max(1), (train_len / 2).max(1));
    let (chunk, local) = match dca_for(train_len) {
        Ok(PositionMap::DualChunk {
            chunk_size,
            local_window,
        }) => (chunk_size, local_window),
        // Below a training length of 8 there is no recommendation; `plan` says so.
        _ => (0, 0),
    };
    let stream_window = train_len.saturating_sub(STREAMING_SINKS);
    let base = [
        (
            "rope".to_string(),
            "RoPE".to_string(),
            Freq::Plain,
            Map::Rope,
        ),
        ("pi".to_string(), "PI".to_string(), Freq::Pi, Map::Rope),
        (
            "ntk".to_string(),
            "NTK-aware".to_string(),
            Freq::NtkAware,
            Map::Rope,
        ),
        (
            "ntk-mixed".to_string(),
            format!("NTK-mixed b={NTK_MIXED_B}"),
            Freq::NtkMixed,
            Map::Rope,
        ),
        (
            "dynamic".to_string(),
            "dynamic NTK".to_string(),
            Freq::Dynamic,
            Map::Rope,
        ),
        (
            "yarn".to_string(),
            "YaRN".to_string(),
            Freq::Yarn,
            Map::Rope,
        ),
        (
            format!("rerope-w{w4}"),
            format!("ReRoPE w={w4}"),
            Freq::Plain,
            Map::ReRope(w4),
        ),
        (
            format!("rerope-w{w2}"),
            format!("ReRoPE w={w2}"),
            Freq::Plain,
            Map::ReRope(w2),
        ),
        (
            format!("leaky-w{w2}"),
            format!("Leaky ReRoPE w={w2}, k(L)"),
            Freq::Plain,
            Map::Leaky(w2),
        ),
        (
            format!("self-extend-w{w4}"),
            format!("Self-Extend W={w4}, G(L)"),
            Freq::Plain,
            Map::SelfExtend,
        ),
        (
            format!("dca-c{chunk}-l{local}"),
            format!("DCA c={chunk}, l={local}"),
            Freq::Plain,
            Map::Dca { logit_scale: false },
        ),
        (
            format!("dca-c{chunk}-l{local}-scaled"),
            format!("DCA c={chunk}, l={local}, logit scale"),
            Freq::Plain,
            Map::Dca { logit_scale: true },
        ),
        (
            format!("streaming-s{STREAMING_SINKS}-w{stream_window}"),
            format!("StreamingLLM S={STREAMING_SINKS}, W={stream_window}"),
            Freq::Plain,
            Map::Streaming(STREAMING_SINKS),
        ),
    ];
    let mut out = Vec::new();
    for (key, label, freq, map) in base {
        for log_n in [false, true] {
            out.push(Scheme {
                key: if log_n {
                    format!("{key}-logn")
                } else {
                    key.clone()
                },
                label: if log_n {
                    format!("{label} + log-n")
                } else {
                    label.clone()
                },
                freq,
                map,
                log_n,
                checkpoint: Checkpoint::Main,
                // --quick: RoPE, NTK-aware, YaRN, ReRoPE w = L/2, Leaky with and
                // without log-n.
                quick: (!log_n
                    && matches!(freq, Freq::Plain | Freq::NtkAware | Freq::Yarn)
                    && matches!(map, Map::Rope | Map::ReRope(_))
                    && !matches!(map, Map::ReRope(w) if w == w4))
                    || matches!(map, Map::Leaky(_)),
                // Per position at 16x: RoPE and both ReRoPE windows.
                per_position: !log_n
                    && freq == Freq::Plain
                    && matches!(map, Map::Rope | Map::ReRope(_)),
            });
        }
    }
    out.push(Scheme {
        key: "inv-leaky".into(),
        label: "inverse-Leaky-trained, RoPE".into(),
        freq: Freq::Plain,
        map: Map::Rope,
        log_n: false,
        checkpoint: Checkpoint::InvLeaky,
        quick: true,
        per_position: false,
    });
    out
}

impl Scheme {
    /// The attention plan for a window of `len` tokens read by `model`.
    ///
    /// Canonical where schemes coincide, so that equal plans are computed once: at
    /// `s = 1` every frequency scheme is plain RoPE, a leak of 1, a Self-Extend group of
    /// 1 and a StreamingLLM cache holding every key are plain RoPE, and log-n and DCA's
    /// logit scale are the identity up to the training length.
    pub fn plan(&self, model: &TinyLm, len: usize) -> Result<Plan> {
        let spec = Spec {
            freq: self.freq,
            map: self.map,
            log_n: self.log_n,
        };
        let cfg = model.config();
        spec.plan(&cfg.rope()?, model.layout(), cfg.train_len, len)
    }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Context lengths, ascending.
    pub lengths: Vec<usize>,
    /// Window end offsets (see [`ropex_lm::protocol::endpoints`]).
    pub ends: Vec<usize>,
    /// Bytes scored at the end of every window (the training length).
    pub scored: usize,
    /// The length at which per-position losses are recorded, if any.
    pub per_position_len: Option<usize>,
}

/// Per-position loss of one scheme at [`Setup::per_position_len`].
#[derive(Debug, Clone)]
pub struct Curve {
    /// Index into the evaluated schemes.
    pub scheme: usize,
    /// Mean NLL (nats) of the target after each position `0..L`, over the windows.
    pub loss: Vec<f64>,
}

/// Evaluation results.
#[derive(Debug, Clone)]
pub struct Results {
    /// `loss[scheme][length]`: mean NLL in nats per byte over the scored bytes.
    pub loss: Vec<Vec<f64>>,
    /// Per-position curves.
    pub curves: Vec<Curve>,
    /// `ms[scheme][length]`: wall-clock milliseconds of the scheme's forward pass over one
    /// window, the fastest of the windows (every window has the same work; the minimum is
    /// the least disturbed by other load). Shared by schemes that coincide at a length.
    pub ms: Vec<Vec<f64>>,
    /// `tiles[scheme][length]`: score-tile products (`Q K^T` per 64 x 64 tile, every piece
    /// of the map a tile touches counted, hidden tiles skipped) of the tiled kernel over one causal
    /// prefill of the window, per head and layer: the compute cost of the position map,
    /// independent of the machine (see [`Plan::tile_products`]).
    pub tiles: Vec<Vec<usize>>,
    /// Score-tile products of plain RoPE at each length (the baseline for `tiles`).
    pub rope_tiles: Vec<usize>,
    /// Seconds spent per length.
    pub seconds: Vec<f64>,
    /// Distinct forward configurations per length (schemes that coincide run once).
    pub runs: Vec<usize>,
}

/// The cost of one forward pass of `len` tokens, in arbitrary units: the linear layers
/// grow with `len`, causal attention with `len^2` (they cross near 3000 tokens for this
/// model).
fn cost(len: usize) -> f64 {
    len as f64 * (1.0 + len as f64 / 3000.0)
}

/// Runs every scheme at every length over every window.
pub fn evaluate(
    main: &TinyLm,
    inv_leaky: Option<&TinyLm>,
    schemes: &[Scheme],
    text: &[u8],
    setup: &Setup,
    progress: &mut Progress,
) -> Result<Results> {
    let model_for = |c: Checkpoint| -> Result<&TinyLm> {
        match c {
            Checkpoint::Main => Ok(main),
            Checkpoint::InvLeaky => inv_leaky.ok_or_else(|| {
                ModelError::Input("the inverse-Leaky checkpoint is not loaded".into())
            }),
        }
    };
    // Distinct (checkpoint, plan) runs per length, and which run serves each scheme.
    let mut plans = Vec::new();
    for &len in &setup.lengths {
        let mut runs: Vec<(Checkpoint, Plan, bool)> = Vec::new();
        let mut of_scheme = Vec::with_capacity(schemes.len());
        for sc in schemes {
            let plan = sc.plan(model_for(sc.checkpoint)?, len)?;
            let per_pos = setup.per_position_len == Some(len) && sc.per_position;
            let found = runs
                .iter()
                .position(|(c, p, _)| *c == sc.checkpoint && *p == plan);
            let idx = match found {
                Some(i) => {
                    runs[i].2 |= per_pos;
                    i
                }
                None => {
                    runs.push((sc.checkpoint, plan, per_pos));
                    runs.len() - 1
                }
            };
            of_scheme.push(idx);
        }
        plans.push((runs, of_scheme));
    }
    let total: f64 = setup
        .lengths
        .iter()
        .zip(&plans)
        .map(|(&len, (runs, _))| cost(len) * (runs.len() * setup.ends.len()) as f64)
        .sum();
    progress.start(total);

    let mut loss = vec![vec![0.0; setup.lengths.len()]; schemes.len()];
    let mut ms = loss.clone();
    let mut tiles = vec![vec![0; setup.lengths.len()]; schemes.len()];
    let mut rope_tiles = Vec::with_capacity(setup.lengths.len());
    let mut curves = Vec::new();
    let mut seconds = Vec::new();
    for (li, (&len, (runs, of_scheme))) in setup.lengths.iter().zip(&plans).enumerate() {
        let t0 = Instant::now();
        let plain = Attention::new(
            main.config().rope()?.frequencies(),
            main.layout(),
            PositionMap::Rope,
        );
        rope_tiles.push(Plan::Single(plain).tile_products(main.config().head_dim, len)?);
        let scored = setup.scored.min(len);
        let mut run_loss = Vec::with_capacity(runs.len());
        let mut run_ms = Vec::with_capacity(runs.len());
        let mut run_tiles = Vec::with_capacity(runs.len());
        let mut run_curve: Vec<Option<Vec<f64>>> = Vec::with_capacity(runs.len());
        for (ri, (checkpoint, plan, per_pos)) in runs.iter().enumerate() {
            let model = model_for(*checkpoint)?;
            let label = schemes
                .iter()
                .zip(of_scheme)
                .filter(|(_, r)| **r == ri)
                .map(|(s, _)| s.key.as_str())
                .collect::<Vec<_>>()
                .join("=");
            let from = if *per_pos { 0 } else { len - scored };
            let mut total_nll = 0.0;
            let mut per_position = vec![0.0; if *per_pos { len } else { 0 }];
            let mut fastest = f64::INFINITY;
            for &e in &setup.ends {
                let t_window = Instant::now();
                let logits = model.forward(&text[e - len..e], plan, from)?;
                let nll = nll_rows(logits.view(), &text[e - len + 1 + from..=e]);
                fastest = fastest.min(t_window.elapsed().as_secs_f64());
                total_nll += nll[nll.len() - scored..].iter().sum::<f64>();
                for (acc, v) in per_position.iter_mut().zip(&nll) {
                    *acc += v;
                }
                progress.advance(cost(len), &format!("L={len} {label}"));
            }
            let n = setup.ends.len() as f64;
            run_ms.push(fastest * 1e3);
            run_tiles.push(plan.tile_products(model.config().head_dim, len)?);
            run_loss.push(total_nll / (n * scored as f64));
            run_curve.push(per_pos.then(|| per_position.iter().map(|v| v / n).collect()));
        }
        for (si, &ri) in of_scheme.iter().enumerate() {
            loss[si][li] = run_loss[ri];
            ms[si][li] = run_ms[ri];
            tiles[si][li] = run_tiles[ri];
            if setup.per_position_len == Some(len)
                && schemes[si].per_position
                && let Some(c) = &run_curve[ri]
            {
                curves.push(Curve {
                    scheme: si,
                    loss: c.clone(),
                });
            }
        }
        seconds.push(t0.elapsed().as_secs_f64());
    }
    progress.finish();
    Ok(Results {
        loss,
        ms,
        tiles,
        rope_tiles,
        curves,
        seconds,
        runs: plans.iter().map(|(r, _)| r.len()).collect(),
    })
}
