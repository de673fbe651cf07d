//! The text form of a map, shared by the CLI's `--map` and the config key:
//! `rope`, `rerope:W`, `leaky:W:K`, `interp:S`, `self-extend:G:W[:SCALE_BASE]`,
//! `dca:CHUNK_SIZE:LOCAL_WINDOW`, `streaming:SINKS:WINDOW`.
//! [`Display`](std::fmt::Display) writes the canonical form and
//! [`FromStr`](std::str::FromStr) reads it back (plus the aliases `leaky_rerope`,
//! `interpolated`, `self_extend`, `streaming_llm`).

use std::fmt;
use std::str::FromStr;

use super::PositionMap;
use crate::error::{Result, RopeError};

/// The accepted forms, for error messages.
pub const MAP_SYNTAX: &str = "rope, rerope:W, leaky:W:K, interp:S, self-extend:G:W[:SCALE_BASE], dca:CHUNK_SIZE:LOCAL_WINDOW or streaming:SINKS:WINDOW";

impl fmt::Display for PositionMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PositionMap::Rope => write!(f, "rope"),
            PositionMap::ReRope { window } => write!(f, "rerope:{window}"),
            PositionMap::LeakyReRope { window, leak } => write!(f, "leaky:{window}:{leak}"),
            PositionMap::Interpolated { factor } => write!(f, "interp:{factor}"),
            PositionMap::SelfExtend {
                group,
                window,
                scale_base,
            } => {
                write!(f, "self-extend:{group}:{window}")?;
                match scale_base {
                    Some(b) => write!(f, ":{b}"),
                    None => Ok(()),
                }
            }
            PositionMap::DualChunk {
                chunk_size,
                local_window,
            } => write!(f, "dca:{chunk_size}:{local_window}"),
            PositionMap::Streaming { sinks, window } => write!(f, "streaming:{sinks}:{window}"),
        }
    }
}

impl FromStr for PositionMap {
    type Err = RopeError;

    /// Parses the forms listed in [`crate::position`]; bad numbers and bad parameters get
    /// typed errors naming the part that is wrong.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let int = |x: &str, what: &str| -> Result<usize> {
            x.trim().parse().map_err(|_| {
                RopeError::invalid(
                    format!("position map '{s}' {what}"),
                    x,
                    "must be a non-negative integer",
                )
            })
        };
        let num = |x: &str, what: &str| -> Result<f64> {
            x.trim().parse().map_err(|_| {
                RopeError::invalid(format!("position map '{s}' {what}"), x, "must be a number")
            })
        };
        match parts.as_slice() {
            ["rope"] => Ok(PositionMap::Rope),
            ["rerope", w] => PositionMap::rerope(int(w, "window")?),
            ["leaky" | "leaky_rerope", w, k] => {
                PositionMap::leaky_rerope(int(w, "window")?, num(k, "leak")?)
            }
            ["interp" | "interpolated", x] => PositionMap::interpolated(num(x, "factor")?),
            ["self-extend" | "self_extend", g, w] => {
                PositionMap::self_extend(int(g, "group")?, int(w, "window")?)
            }
            ["self-extend" | "self_extend", g, w, b] => PositionMap::self_extend_scaled(
                int(g, "group")?,
                int(w, "window")?,
                num(b, "scale_base")?,
            ),
            ["dca", c, l] => PositionMap::dca(int(c, "chunk_size")?, int(l, "local_window")?),
            ["streaming" | "streaming_llm", n, w] => {
                PositionMap::streaming(int(n, "sinks")?, int(w, "window")?)
            }
            _ => Err(RopeError::invalid(
                "position map",
                s,
                format!("expected {MAP_SYNTAX}"),
            )),
        }
    }
}
