//! The four commands.

use std::io::Write;

use std::path::Path;

use ndarray::Array3;
use ndarray_npy::{ReadNpyError, read_npy, write_npy};
use ropex::attention::{Attention, Mask};
use ropex::config::ModelRope;
use ropex::gguf::GgufRope;
use ropex::{Frequencies, Layout, PositionMap, Regime, RopeConfig};
use serde::Serialize;

use crate::args::{
    AttendArgs, ConfigOptions, ExplainArgs, FreqsArgs, LayoutArg, ModelSource, PositionsArgs,
};
use crate::{Failure, write_out};

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

/// Reads the config and reports its warnings on `err`.
fn load(path: &Path, read: &ConfigOptions, err: &mut dyn Write) -> Result<ModelRope, Failure> {
    let rope = ModelRope::from_path_with(path, read.layer_type.as_deref(), &read.parse_options())?;
    for w in &rope.warnings {
        // Diagnostics only: a failing stderr is not worth failing the command.
        let _ = writeln!(err, "warning: {w}");
    }
    Ok(rope)
}

/// A model's rotary embedding as `freqs` and `explain` use it, read from a config.json
/// or a GGUF file.
struct Model {
    config: RopeConfig,
    /// One line naming where the embedding comes from and its shape.
    description: String,
    notes: Vec<String>,
    train_len: Option<usize>,
    /// The length the model is meant to read (the default target of `explain`).
    max_len: Option<usize>,
    /// The pair layout of the file's Q/K weights (GGUF only: a config.json does not say).
    layout: Option<Layout>,
}

impl Model {
    fn load(
        source: &ModelSource,
        read: &ConfigOptions,
        err: &mut dyn Write,
    ) -> Result<Self, Failure> {
        let shape = |c: &RopeConfig| {
            format!(
                "head_dim {}, rotary_dim {}, base {}",
                c.head_dim(),
                c.rotary_dim(),
                c.base()
            )
        };
        match (&source.config, &source.gguf) {
            (Some(path), None) => {
                let rope = load(path, read, err)?;
                Ok(Model {
                    description: format!(
                        "model_type {}, rope_type {}{}, {}",
                        rope.model_type.as_deref().unwrap_or("-"),
                        rope.rope_type,
                        rope.layer_type
                            .as_ref()
                            .map(|t| format!(" ({t})"))
                            .unwrap_or_default(),
                        shape(&rope.config)
                    ),
                    train_len: rope.train_len(),
                    max_len: rope.max_position_embeddings,
                    notes: rope.notes,
                    config: rope.config,
                    layout: None,
                })
            }
            (None, Some(path)) => {
                if read.layer_type.is_some() || read.strict || read.no_extensions {
                    return Err(usage(
                        "--layer-type, --strict and --no-extensions apply to --config only",
                    ));
                }
                let rope = GgufRope::from_path(path)?;
                Ok(Model {
                    description: format!(
                        "gguf arch {}, scaling {}, layout {}, {}",
                        rope.arch,
                        rope.scaling_type,
                        layout_name(rope.layout),
                        shape(&rope.config)
                    ),
                    train_len: rope.train_len(),
                    max_len: rope.context_len,
                    notes: rope.notes,
                    config: rope.config,
                    layout: Some(rope.layout),
                })
            }
            // clap's argument group admits exactly one of the two.
            _ => Err(usage("give exactly one of --config FILE or --gguf FILE")),
        }
    }

    fn frequencies(&self, seq_len: Option<usize>) -> Frequencies {
        match seq_len {
            Some(n) => self.config.frequencies_for_len(n),
            None => self.config.frequencies(),
        }
    }
}

/// `", sliding window N, chunked C"` for the masks that are set.
fn mask_suffix(mask: &Mask) -> String {
    let mut s = String::new();
    if let Some(w) = mask.sliding_window() {
        s += &format!(", sliding window {w}");
    }
    if let Some(c) = mask.chunk() {
        s += &format!(", chunked {c}");
    }
    s
}

/// A layout as `--layout` spells it.
fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Half => "half",
        Layout::Interleaved => "interleaved",
    }
}

/// `freqs --json`: exactly these keys, in this order (`layout` for GGUF files only).
#[derive(Serialize)]
struct FreqsJson<'a> {
    inv_freq: &'a [f64],
    attention_factor: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<&'static str>,
}

pub fn freqs(a: &FreqsArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let seq_len = a.seq_len;
    let rope = Model::load(&a.source, &a.read, err)?;
    let f = rope.frequencies(seq_len);
    if a.json {
        let json = serde_json::to_string(&FreqsJson {
            inv_freq: f.inv_freq(),
            attention_factor: f.attention_factor(),
            layout: rope.layout.map(layout_name),
        })
        .map_err(|e| Failure::Run(format!("cannot encode JSON: {e}")))?;
        return write_out(out, &(json + "\n"));
    }
    let mut s = format!("# {}\n", rope.description);
    s += &format!(
        "# seq_len {}, attention_factor {}\n",
        seq_len.map_or("- (model initialisation)".into(), |n| n.to_string()),
        f.attention_factor()
    );
    for n in &rope.notes {
        s += &format!("# note: {n}\n");
    }
    s += &format!("{:>5}  {:>24}  {:>14}\n", "pair", "inv_freq", "wavelength");
    for (j, (w, lam)) in f.inv_freq().iter().zip(f.wavelengths()).enumerate() {
        s += &format!("{j:>5}  {w:>24.17e}  {:>14}\n", fmt_num(lam));
    }
    write_out(out, &s)
}

pub fn explain(a: &ExplainArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let rope = Model::load(&a.source, &a.read, err)?;
    let train_len = match a.train_len {
        Some(l) => l,
        None => rope
            .train_len
            .ok_or_else(|| usage("the model names no training length; give --train-len"))?,
    };
    if train_len == 0 {
        return Err(usage("--train-len must be >= 1"));
    }
    let target_len = match a.target_len {
        Some(l) => Some(l),
        None => rope.max_len.filter(|&m| m > train_len),
    };
    let seq_len = a.seq_len.or(target_len);
    let f = rope.frequencies(seq_len);
    let plain = rope.config.plain_frequencies();
    let report = f.explain(&plain, train_len, target_len)?;

    let mut s = format!("# {}\n", rope.description);
    s += &format!(
        "# train_len {train_len}, target_len {}, frequencies for seq_len {}, attention_factor {}\n",
        target_len.map_or("-".into(), |t| t.to_string()),
        seq_len.map_or("- (model initialisation)".into(), |n| n.to_string()),
        f.attention_factor()
    );
    s += "# stretch = theta_j / inv_freq_j; turns = train_len * theta_j / 2pi; \
          target/train = largest angle at the target over the largest in training\n";
    let header = [
        "pair",
        "wavelength",
        "turns in training",
        "stretch",
        "regime",
        "target/train angle",
    ];
    let rows: Vec<[String; 6]> = report
        .iter()
        .map(|r| {
            [
                r.pair.to_string(),
                fmt_num(r.wavelength),
                fmt_num(r.turns_in_training),
                fmt_num(r.stretch),
                r.regime.name().to_string(),
                r.target_angle_ratio.map_or("-".into(), fmt_num),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: [&str; 6]| -> String {
        let mut l = String::new();
        for (c, cell) in cells.iter().enumerate() {
            if c == 4 {
                l += &format!("  {cell:<w$}", w = widths[c]);
            } else {
                l += &format!("  {cell:>w$}", w = widths[c]);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    s += &line(header);
    for r in &rows {
        s += &line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    s += &summary(&report);
    s.push('\n');
    write_out(out, &s)
}

/// "pairs 0-28 extrapolated, 29-34 blended, 35-63 interpolated; N pairs never completed a
/// turn in training"
fn summary(report: &[ropex::PairReport]) -> String {
    let mut runs: Vec<(usize, usize, Regime)> = Vec::new();
    for r in report {
        match runs.last_mut() {
            Some((_, end, regime)) if *regime == r.regime && *end + 1 == r.pair => *end = r.pair,
            _ => runs.push((r.pair, r.pair, r.regime)),
        }
    }
    let parts: Vec<String> = runs
        .iter()
        .map(|&(a, b, regime)| {
            if a == b {
                format!("{a} {}", regime.name())
            } else {
                format!("{a}-{b} {}", regime.name())
            }
        })
        .collect();
    let never = report.iter().filter(|r| r.turns_in_training < 1.0).count();
    let unseen = report
        .iter()
        .filter(|r| {
            r.turns_in_training < 1.0 && r.target_angle_ratio.is_some_and(|x| x > 1.0 + 1e-9)
        })
        .count();
    let mut s = format!(
        "pairs {}; {never} pair{} never completed a turn in training",
        parts.join(", "),
        if never == 1 { "" } else { "s" }
    );
    if report.iter().any(|r| r.target_angle_ratio.is_some()) {
        s += &format!(", {unseen} of them reach angles at the target never seen in training");
    }
    s
}

/// A compact number: integers as such, others with 4 significant digits.
fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return if x > 0.0 { "inf".into() } else { x.to_string() };
    }
    if x == x.round() && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    let a = x.abs();
    if (1e-3..1e6).contains(&a) {
        let digits = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{x:.digits$}")
    } else {
        format!("{x:.3e}")
    }
}

pub fn positions(a: &PositionsArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let (map, n, offset) = (a.map, a.n, a.offset);
    let end = offset
        .checked_add(n)
        .ok_or_else(|| usage("--offset + --n is too large"))?;
    let keys = a.keys.unwrap_or(end);
    const LIMIT: usize = 1 << 20;
    if n == 0 || keys == 0 {
        return Err(usage("--n and --keys must be >= 1"));
    }
    if n.saturating_mul(keys) > LIMIT {
        return Err(usage(format!(
            "a {n} x {keys} matrix is too large to print (at most {LIMIT} entries)"
        )));
    }
    let causal = !a.non_causal;
    let mask = a.mask.mask()?;
    let m = map.position_matrix(n, keys, offset)?;
    let cells: Vec<Vec<String>> = (0..n)
        .map(|a| {
            let i = offset + a;
            (0..keys)
                .map(|j| {
                    let p = m[[a, j]];
                    if causal && j > i {
                        ".".to_string()
                    } else if p.is_nan() || !map.sees(i, j) || !mask.allows(i, j) {
                        "-".to_string()
                    } else {
                        fmt_num(p)
                    }
                })
                .collect()
        })
        .collect();
    let width = cells
        .iter()
        .flatten()
        .map(String::len)
        .chain((0..keys).map(|j| j.to_string().len()))
        .max()
        .unwrap_or(1);
    let qw = (offset + n).to_string().len().max(3);
    let masks = mask_suffix(&mask);
    let legend = if causal {
        "'.' = after the query (causal), '-' = hidden by the map or mask"
    } else {
        "'-' = hidden by the map or mask"
    };
    let mut s = format!(
        "# P(i, j) for {map}{masks}: queries i = {offset}..{}, keys j = 0..{keys} ({legend})\n",
        offset + n,
    );
    s += &format!("{:>qw$} |", "i\\j");
    for j in 0..keys {
        s += &format!(" {j:>width$}");
    }
    s.push('\n');
    for (a, row) in cells.iter().enumerate() {
        s += &format!("{:>qw$} |", offset + a);
        for c in row {
            s += &format!(" {c:>width$}");
        }
        s.push('\n');
    }
    write_out(out, &s)
}

/// Reads a rank-3 `.npy` file of `'<f4'` or `'<f8'` values (the latter narrowed to f32).
fn read_array3(path: &Path) -> Result<Array3<f32>, Failure> {
    let bad = |e: ReadNpyError| match e {
        ReadNpyError::Io(e) => Failure::Run(format!("cannot read {}: {e}", path.display())),
        other => Failure::Run(format!(
            "{} is not a valid .npy file of rank-3 '<f4' or '<f8' values: {other}",
            path.display()
        )),
    };
    match read_npy::<_, Array3<f32>>(path) {
        Ok(a) => Ok(a),
        Err(ReadNpyError::WrongDescriptor(_)) => read_npy::<_, Array3<f64>>(path)
            .map(|a| a.mapv(|x| x as f32))
            .map_err(bad),
        Err(e) => Err(bad(e)),
    }
}

pub fn attend(a: &AttendArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let layout = match a.layout {
        LayoutArg::Half => Layout::Half,
        LayoutArg::Interleaved => Layout::Interleaved,
    };
    // Where the frequencies come from: Ok(config path) or Err(base).
    let source: Result<&Path, f64> = match (&a.config, a.base) {
        (Some(path), None) => Ok(path),
        (None, Some(b)) => Err(b),
        (Some(_), Some(_)) => return Err(usage("give either --config or --base, not both")),
        (None, None) => {
            return Err(usage(
                "'attend' needs --config FILE or --base B for the frequencies",
            ));
        }
    };
    let q = read_array3(&a.q)?;
    let k = read_array3(&a.k)?;
    let v = read_array3(&a.v)?;
    let (n_q, _, d) = q.dim();
    let n_k = k.dim().0;
    if n_q > n_k {
        return Err(Failure::Run(format!(
            "q has {n_q} tokens but k only {n_k}: queries are the last n_q of the n_k key positions"
        )));
    }

    let (freqs, config_map): (Frequencies, Option<PositionMap>) = match source {
        Ok(path) => {
            let rope = load(path, &a.read, err)?;
            (
                rope.frequencies_for_len(a.seq_len.unwrap_or(n_k)),
                rope.position_map,
            )
        }
        Err(b) => (RopeConfig::new(d, b)?.frequencies(), None),
    };
    let map = a.map.or(config_map).unwrap_or(PositionMap::Rope);
    let mut att = Attention::new(freqs, layout, map)
        .with_causal(!a.non_causal)
        .with_mask(a.mask.mask()?)?;
    if let Some(l) = a.log_n {
        att = att.with_log_n(l)?;
    }
    if let Some(s) = a.scale {
        att = att.with_scale(s)?;
    }
    let q_pos: Vec<usize> = (n_k - n_q..n_k).collect();
    let k_pos: Vec<usize> = (0..n_k).collect();
    let (q, k, v) = (q.view(), k.view(), v.view());
    let (result, _) = att.run(a.kernel, q, k, v, &q_pos, &k_pos)?;
    let op = a.out.display();
    write_npy(&a.out, &result).map_err(|e| Failure::Run(format!("cannot write {op}: {e}")))?;
    let (x, y, z) = result.dim();
    let masks = mask_suffix(&att.mask());
    write_out(
        out,
        &format!(
            "wrote {op}: [{x}, {y}, {z}] f32 ({} kernel, {map}{masks}, {})\n",
            a.kernel,
            layout_name(layout)
        ),
    )
}
