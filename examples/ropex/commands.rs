//! The four commands.

use std::io::Write;

use ropex::attention::Attention;
use ropex::config::{ModelRope, ParseOptions};
use ropex::{Frequencies, Layout, PositionMap, Regime, RopeConfig, npy};

use crate::args::{Spec, Usage};
use crate::{Failure, write_out};

fn parse_options(o: &crate::args::Opts) -> ParseOptions {
    ParseOptions {
        strict: o.flag("strict"),
        extensions: !o.flag("no-extensions"),
    }
}

/// Reads the config and reports its warnings on `err`.
fn load(
    path: &str,
    layer_type: Option<&str>,
    opts: &ParseOptions,
    err: &mut dyn Write,
) -> Result<ModelRope, Failure> {
    let rope = ModelRope::from_path_with(path, layer_type, opts)?;
    for w in &rope.warnings {
        // Diagnostics only: a failing stderr is not worth failing the command.
        let _ = writeln!(err, "warning: {w}");
    }
    Ok(rope)
}

fn describe(rope: &ModelRope) -> String {
    let c = &rope.config;
    format!(
        "model_type {}, rope_type {}{}, head_dim {}, rotary_dim {}, base {}",
        rope.model_type.as_deref().unwrap_or("-"),
        rope.rope_type,
        rope.layer_type
            .as_ref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default(),
        c.head_dim(),
        c.rotary_dim(),
        c.base()
    )
}

pub fn freqs(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let o = Spec {
        command: "freqs",
        values: &["config", "seq-len", "layer-type"],
        flags: &["json", "strict", "no-extensions"],
    }
    .parse(args)?;
    let path = o.required("config")?;
    let seq_len: Option<usize> = o.parsed("seq-len", "a non-negative integer")?;
    let rope = load(path, o.str("layer-type"), &parse_options(&o), err)?;
    let f = match seq_len {
        Some(n) => rope.frequencies_for_len(n),
        None => rope.frequencies(),
    };
    if o.flag("json") {
        let inv = serde_json::to_string(f.inv_freq())
            .map_err(|e| Failure::Run(format!("cannot encode JSON: {e}")))?;
        let att = serde_json::to_string(&f.attention_factor())
            .map_err(|e| Failure::Run(format!("cannot encode JSON: {e}")))?;
        return write_out(
            out,
            &format!("{{\"inv_freq\": {inv}, \"attention_factor\": {att}}}\n"),
        );
    }
    let mut s = format!("# {}\n", describe(&rope));
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

pub fn explain(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let o = Spec {
        command: "explain",
        values: &["config", "train-len", "target-len", "seq-len", "layer-type"],
        flags: &["strict", "no-extensions"],
    }
    .parse(args)?;
    let path = o.required("config")?;
    let rope = load(path, o.str("layer-type"), &parse_options(&o), err)?;
    let train_len = match o.parsed::<usize>("train-len", "a positive integer")? {
        Some(l) => l,
        None => rope
            .train_len()
            .ok_or_else(|| Usage("the config names no training length; give --train-len".into()))?,
    };
    if train_len == 0 {
        return Err(Usage("--train-len must be >= 1".into()).into());
    }
    let target_len = match o.parsed::<usize>("target-len", "a positive integer")? {
        Some(l) => Some(l),
        None => rope.max_position_embeddings.filter(|&m| m > train_len),
    };
    let seq_len = o
        .parsed::<usize>("seq-len", "a non-negative integer")?
        .or(target_len);
    let f = match seq_len {
        Some(n) => rope.frequencies_for_len(n),
        None => rope.frequencies(),
    };
    let plain = rope.config.plain_frequencies();
    let report = f.explain(&plain, train_len, target_len)?;

    let mut s = format!("# {}\n", describe(&rope));
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

/// `rope | rerope:W | leaky:W:K | interp:S`.
fn parse_map(s: &str) -> Result<PositionMap, Failure> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = |what: &str| {
        Failure::Usage(format!(
            "--map '{s}': {what} (expected rope, rerope:W, leaky:W:K or interp:S)"
        ))
    };
    let window = |w: &str| -> Result<usize, Failure> {
        w.parse()
            .map_err(|_| bad(&format!("window '{w}' is not a non-negative integer")))
    };
    let number = |x: &str, what: &str| -> Result<f64, Failure> {
        x.parse()
            .map_err(|_| bad(&format!("{what} '{x}' is not a number")))
    };
    Ok(match parts.as_slice() {
        ["rope"] => PositionMap::Rope,
        ["rerope", w] => PositionMap::rerope(window(w)?)?,
        ["leaky" | "leaky_rerope", w, k] => {
            PositionMap::leaky_rerope(window(w)?, number(k, "leak")?)?
        }
        ["interp" | "interpolated", f] => PositionMap::interpolated(number(f, "factor")?)?,
        _ => return Err(bad("unknown map")),
    })
}

pub fn positions(args: &[String], out: &mut dyn Write) -> Result<(), Failure> {
    let o = Spec {
        command: "positions",
        values: &["map", "n", "offset", "keys"],
        flags: &["non-causal"],
    }
    .parse(args)?;
    let map = parse_map(o.required("map")?)?;
    let n: usize = o.parsed("n", "a positive integer")?.unwrap_or(16);
    let offset: usize = o.parsed("offset", "a non-negative integer")?.unwrap_or(0);
    let end = offset
        .checked_add(n)
        .ok_or_else(|| Usage("--offset + --n is too large".into()))?;
    let keys: usize = o.parsed("keys", "a positive integer")?.unwrap_or(end);
    const LIMIT: usize = 1 << 20;
    if n == 0 || keys == 0 {
        return Err(Usage("--n and --keys must be >= 1".into()).into());
    }
    if n.saturating_mul(keys) > LIMIT {
        return Err(Usage(format!(
            "a {n} x {keys} matrix is too large to print (at most {LIMIT} entries)"
        ))
        .into());
    }
    let causal = !o.flag("non-causal");
    let m = map.position_matrix(n, keys, offset)?;
    let cells: Vec<Vec<String>> = (0..n)
        .map(|a| {
            (0..keys)
                .map(|j| {
                    if causal && j > offset + a {
                        ".".to_string()
                    } else {
                        fmt_num(m[[a, j]])
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
    let mut s = format!(
        "# P(i, j) for {map:?}: queries i = {offset}..{}, keys j = 0..{keys}{}\n",
        offset + n,
        if causal {
            " (causal: '.' = masked)"
        } else {
            ""
        }
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

pub fn attend(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let o = Spec {
        command: "attend",
        values: &[
            "q",
            "k",
            "v",
            "out",
            "map",
            "config",
            "base",
            "layer-type",
            "seq-len",
            "layout",
            "kernel",
            "log-n",
            "scale",
        ],
        flags: &["non-causal", "strict", "no-extensions"],
    }
    .parse(args)?;
    let (qp, kp, vp, op) = (
        o.required("q")?,
        o.required("k")?,
        o.required("v")?,
        o.required("out")?,
    );
    let layout = match o.str("layout").unwrap_or("half") {
        "half" => Layout::Half,
        "interleaved" => Layout::Interleaved,
        other => {
            return Err(Usage(format!(
                "--layout must be half or interleaved, got '{other}'"
            ))
            .into());
        }
    };
    let kernel = o.str("kernel").unwrap_or("reference");
    if !matches!(kernel, "reference" | "two-pass" | "tiled") {
        return Err(Usage(format!(
            "--kernel must be reference, two-pass or tiled, got '{kernel}'"
        ))
        .into());
    }
    let base: Option<f64> = o.parsed("base", "a number")?;
    let log_n: Option<usize> = o.parsed("log-n", "a positive integer")?;
    let scale: Option<f64> = o.parsed("scale", "a number")?;
    let seq_len: Option<usize> = o.parsed("seq-len", "a non-negative integer")?;

    // Where the frequencies come from: Ok(config path) or Err(base).
    let source: Result<&str, f64> = match (o.str("config"), base) {
        (Some(path), None) => Ok(path),
        (None, Some(b)) => Err(b),
        (Some(_), Some(_)) => {
            return Err(Usage("give either --config or --base, not both".into()).into());
        }
        (None, None) => {
            return Err(Usage(
                "'attend' needs --config FILE or --base B for the frequencies".into(),
            )
            .into());
        }
    };
    let q = npy::read_array3(qp)?;
    let k = npy::read_array3(kp)?;
    let v = npy::read_array3(vp)?;
    let (n_q, _, d) = q.dim();
    let n_k = k.dim().0;
    if n_q > n_k {
        return Err(Failure::Run(format!(
            "q has {n_q} tokens but k only {n_k}: queries are the last n_q of the n_k key positions"
        )));
    }

    let (freqs, config_map): (Frequencies, Option<PositionMap>) = match source {
        Ok(path) => {
            let rope = load(path, o.str("layer-type"), &parse_options(&o), err)?;
            (
                rope.frequencies_for_len(seq_len.unwrap_or(n_k)),
                rope.position_map,
            )
        }
        Err(b) => (RopeConfig::new(d, b)?.frequencies(), None),
    };
    let map = match o.str("map") {
        Some(m) => parse_map(m)?,
        None => config_map.unwrap_or(PositionMap::Rope),
    };
    let mut att = Attention::new(freqs, layout, map).with_causal(!o.flag("non-causal"));
    if let Some(l) = log_n {
        att = att.with_log_n(l)?;
    }
    if let Some(s) = scale {
        att = att.with_scale(s)?;
    }
    let q_pos: Vec<usize> = (n_k - n_q..n_k).collect();
    let k_pos: Vec<usize> = (0..n_k).collect();
    let result = match kernel {
        "reference" => att.reference(q.view(), k.view(), v.view(), &q_pos, &k_pos)?,
        "two-pass" => att.two_pass(q.view(), k.view(), v.view(), &q_pos, &k_pos)?,
        _ => att.tiled(q.view(), k.view(), v.view(), &q_pos, &k_pos)?,
    };
    npy::write_array3(op, result.view())?;
    let (a, b, c) = result.dim();
    write_out(
        out,
        &format!("wrote {op}: [{a}, {b}, {c}] f32 ({kernel} kernel, {map:?}, {layout:?})\n"),
    )
}
