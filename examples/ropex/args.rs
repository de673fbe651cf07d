//! A small command-line option parser: `--name value`, `--name=value` and boolean
//! `--flag`s, each declared per command, with one-line errors.

use std::collections::BTreeMap;
use std::str::FromStr;

/// A usage error (bad flag, missing value): printed as one line, exit code 2.
#[derive(Debug)]
pub struct Usage(pub String);

/// The declared options of one command.
pub struct Spec {
    pub command: &'static str,
    pub values: &'static [&'static str],
    pub flags: &'static [&'static str],
}

/// Parsed options.
#[derive(Debug, Default)]
pub struct Opts {
    command: String,
    values: BTreeMap<String, String>,
    flags: Vec<String>,
}

impl Spec {
    pub fn parse(&self, args: &[String]) -> Result<Opts, Usage> {
        let mut opts = Opts {
            command: self.command.to_string(),
            ..Opts::default()
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(Usage(format!(
                    "unexpected argument '{arg}' for '{}' (options start with --; see ropex {} --help)",
                    self.command, self.command
                )));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if self.flags.contains(&name) {
                if inline.is_some() {
                    return Err(Usage(format!("--{name} takes no value")));
                }
                if opts.flags.iter().any(|f| f == name) {
                    return Err(Usage(format!("--{name} given twice")));
                }
                opts.flags.push(name.to_string());
            } else if self.values.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| Usage(format!("--{name} needs a value")))?,
                };
                if opts.values.insert(name.to_string(), value).is_some() {
                    return Err(Usage(format!("--{name} given twice")));
                }
            } else {
                return Err(Usage(format!(
                    "unknown option --{name} for '{}' (see ropex {} --help)",
                    self.command, self.command
                )));
            }
        }
        Ok(opts)
    }
}

impl Opts {
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, Usage> {
        self.str(name).ok_or_else(|| {
            Usage(format!(
                "'{}' needs --{name} (see ropex {} --help)",
                self.command, self.command
            ))
        })
    }

    /// A parsed value, e.g. a `usize` or an `f64`.
    pub fn parsed<T: FromStr>(&self, name: &str, what: &str) -> Result<Option<T>, Usage> {
        match self.str(name) {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| Usage(format!("--{name} must be {what}, got '{s}'"))),
        }
    }
}
