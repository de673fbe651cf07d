//! Small helpers over `serde_json::Value` that read the way Python reads a config dict.

use serde_json::{Map, Value};

use crate::error::{Result, RopeError};

/// A JSON object.
pub(crate) type Obj = Map<String, Value>;

/// A short rendering of a value for messages (long lists are elided).
pub(crate) fn show(v: &Value) -> String {
    let s = match v {
        Value::Array(a) if a.len() > 6 => {
            let head: Vec<String> = a.iter().take(3).map(|x| x.to_string()).collect();
            format!("[{}, ... ({} values)]", head.join(", "), a.len())
        }
        _ => v.to_string(),
    };
    if s.chars().count() > 120 {
        let cut: String = s.chars().take(117).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// What kind of JSON value this is, for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Python truthiness of a JSON value.
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The number a JSON value holds (booleans are not numbers here, unlike in Python).
pub(crate) fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// True for a JSON integer literal (`8192`, not `8192.0`).
pub(crate) fn is_int_literal(v: &Value) -> bool {
    matches!(v, Value::Number(n) if n.is_i64() || n.is_u64())
}

/// A finite number, or a typed error naming `field`.
pub(crate) fn need_number(field: &str, v: &Value, allowed: &str) -> Result<f64> {
    match number(v) {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(RopeError::invalid(
            field,
            show(v),
            format!("must be {allowed} (got {})", kind(v)),
        )),
    }
}

/// A non-negative integer that fits `usize`: a JSON integer literal, or (when
/// `allow_integral_float`) a float with no fractional part.
pub(crate) fn need_count(
    field: &str,
    v: &Value,
    allow_integral_float: bool,
    allowed: &str,
) -> Result<usize> {
    let bad = || {
        RopeError::invalid(
            field,
            show(v),
            format!("must be {allowed} (got {})", kind(v)),
        )
    };
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                usize::try_from(u).map_err(|_| bad())
            } else if n.is_i64() {
                Err(bad())
            } else {
                let x = n.as_f64().ok_or_else(bad)?;
                if allow_integral_float
                    && x.is_finite()
                    && x >= 0.0
                    && x.fract() == 0.0
                    && x <= 9.007_199_254_740_992e15
                {
                    Ok(x as usize)
                } else {
                    Err(bad())
                }
            }
        }
        _ => Err(bad()),
    }
}

/// `d.get(key)`, with JSON `null` read as absent.
pub(crate) fn get_some<'a>(d: &'a Obj, key: &str) -> Option<&'a Value> {
    d.get(key).filter(|v| !v.is_null())
}

/// Inserts `value` under `key` unless the key is present (Python's `dict.setdefault`).
pub(crate) fn setdefault(d: &mut Obj, key: &str, value: Value) {
    if !d.contains_key(key) {
        d.insert(key.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn truthiness_follows_python() {
        for v in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(!truthy(&v), "{v}");
        }
        for v in [
            json!(true),
            json!(1),
            json!(-0.5),
            json!("x"),
            json!([0]),
            json!({"a": 1}),
        ] {
            assert!(truthy(&v), "{v}");
        }
    }

    #[test]
    fn counts_and_numbers() {
        assert_eq!(need_count("k", &json!(8192), false, "n").unwrap(), 8192);
        assert!(need_count("k", &json!(8192.0), false, "n").is_err());
        assert_eq!(need_count("k", &json!(8192.0), true, "n").unwrap(), 8192);
        assert!(need_count("k", &json!(8192.5), true, "n").is_err());
        assert!(need_count("k", &json!(-1), true, "n").is_err());
        assert!(need_count("k", &json!(1e300), true, "n").is_err());
        assert!(need_count("k", &json!("8"), true, "n").is_err());
        assert!(need_number("k", &json!(true), "a number").is_err());
        assert_eq!(need_number("k", &json!(3), "a number").unwrap(), 3.0);
        let long = json!([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(show(&long), "[1, 2, 3, ... (8 values)]");
    }
}
