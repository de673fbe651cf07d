//! Markdown tables of evaluation results: one row per scheme, one column per context
//! length, the best value of each column (lowest loss, highest accuracy) in bold.

/// A markdown table: header `first | columns...`, one line per row, values with
/// `decimals` decimals, `-` for a missing value. In each column every value that prints
/// the same as the column's best (its minimum with [`Best::Lowest`], maximum with
/// [`Best::Highest`]) is bold (ties are all bold, so the bold text is what
/// the reader can check against the printed digits).
///
/// ```
/// let rows = vec![
///     ("RoPE".to_string(), vec![Some(2.94), Some(7.74)]),
///     ("ReRoPE".to_string(), vec![Some(2.96), Some(2.98)]),
/// ];
/// use ropex_lm::report::{Best, markdown_table};
/// let t = markdown_table("scheme", &["8k".into(), "16k".into()], &rows, 2, Best::Lowest);
/// assert_eq!(t, "| scheme | 8k | 16k |\n|---|---|---|\n| RoPE | **2.94** | 7.74 |\n| ReRoPE | 2.96 | **2.98** |\n");
/// ```
pub fn markdown_table(
    first: &str,
    columns: &[String],
    rows: &[(String, Vec<Option<f64>>)],
    decimals: usize,
    best: Best,
) -> String {
    let better = |a: f64, b: f64| match best {
        Best::Lowest => a.min(b),
        Best::Highest => a.max(b),
    };
    let fmt = |v: f64| format!("{v:.decimals$}");
    let best: Vec<Option<String>> = (0..columns.len())
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.1.get(c).copied().flatten())
                .filter(|v| v.is_finite())
                .fold(None, |m: Option<f64>, v| {
                    Some(m.map_or(v, |m| better(m, v)))
                })
                .map(fmt)
        })
        .collect();
    let mut out = format!("| {first} |");
    for c in columns {
        out += &format!(" {c} |");
    }
    out += "\n|---|";
    out += &"---|".repeat(columns.len());
    out += "\n";
    for (name, values) in rows {
        out += &format!("| {name} |");
        for (c, b) in best.iter().enumerate() {
            out += &match values.get(c).copied().flatten() {
                Some(v) if Some(fmt(v)) == *b => format!(" **{}** |", fmt(v)),
                Some(v) => format!(" {} |", fmt(v)),
                None => " - |".into(),
            };
        }
        out += "\n";
    }
    out
}

/// Which value of a column is the best.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Best {
    /// The minimum (a loss).
    Lowest,
    /// The maximum (an accuracy).
    Highest,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The minimum of each column is bold, ties at the printed precision both, missing
    /// values are `-` and do not count, and a column of only missing values has no bold.
    #[test]
    fn best_per_column_is_bold() {
        let rows = vec![
            ("a".to_string(), vec![Some(3.0001), None, Some(1.0)]),
            ("b".to_string(), vec![Some(2.9999), None, Some(0.5)]),
            ("c".to_string(), vec![Some(4.0), None]),
        ];
        let cols = ["x".to_string(), "y".into(), "z".into()];
        let t = markdown_table("s", &cols, &rows, 2, Best::Lowest);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| s | x | y | z |");
        assert_eq!(lines[1], "|---|---|---|---|");
        assert_eq!(lines[2], "| a | **3.00** | - | 1.00 |");
        assert_eq!(lines[3], "| b | **3.00** | - | **0.50** |");
        assert_eq!(lines[4], "| c | 4.00 | - | - |");
        let t3 = markdown_table("s", &cols, &rows, 4, Best::Lowest);
        assert!(t3.contains("| a | 3.0001 |") && t3.contains("| b | **2.9999** |"));
        let hi = markdown_table("s", &cols, &rows, 2, Best::Highest);
        assert!(
            hi.contains("| c | **4.00** | - | - |") && hi.contains("| a | 3.00 | - | **1.00** |")
        );
    }
}
