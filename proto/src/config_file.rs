//! Reading a program's TOML configuration file, shared by `overlayd` and
//! `overlay-coord` so that both report a mistake the same way: one line that
//! names the file, the line and the key.
//!
//! The types a file parses into should carry `#[serde(deny_unknown_fields)]`:
//! a misspelt key is then an error here instead of a setting silently ignored.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML, or not the shape the program expects.
    #[error("{place}: {message}")]
    Parse { place: Place, message: String },
    /// The file parsed, but a value in it is not acceptable.
    #[error("{place}: {message}")]
    Value { place: Place, message: String },
    /// A value (from a flag, or from several sources together) is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

/// Where in a config file a mistake is: `config file F, line N, key `K``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub path: PathBuf,
    /// 1-based; `None` when only the key is known.
    pub line: Option<usize>,
    /// Dotted, with the enclosing table: `turn.ttl`.
    pub key: Option<String>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config file {}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// A bad value for `key`: placed in the file when the value came from one,
    /// else (a flag, a default) named by its key alone.
    pub fn bad_key(file: Option<&Path>, key: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        match file {
            Some(path) => ConfigError::Value {
                place: Place {
                    path: path.to_owned(),
                    line: None,
                    key: Some(key.to_owned()),
                },
                message,
            },
            None => ConfigError::Invalid(format!("`{key}`: {message}")),
        }
    }
}

/// Reads and parses `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Like [`load`], but a file that does not exist is an empty configuration:
/// for a default path that a program runs without.
pub fn load_if_present<T: DeserializeOwned + Default>(path: &Path) -> Result<T, ConfigError> {
    match load(path) {
        Err(ConfigError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(T::default())
        }
        other => other,
    }
}

/// Parses `text`, the contents of `path` (named in errors).
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, key) = match e.span() {
            Some(span) => {
                let (line, key) = locate(text, span.start);
                (Some(line), key)
            }
            None => (None, None),
        };
        ConfigError::Parse {
            place: Place {
                path: path.to_owned(),
                line,
                key,
            },
            message: e.message().trim().replace('\n', " "),
        }
    })
}

/// The 1-based line of byte `offset` in `text`, and the dotted key written on
/// that line (under the last `[table]` header above it), if the line holds one.
fn locate(text: &str, offset: usize) -> (usize, Option<String>) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_no = before.matches('\n').count();
    let mut table: Option<String> = None;
    let mut key = None;
    for (i, line) in text.lines().enumerate().take(line_no + 1) {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[');
            let name = name.split(']').next().unwrap_or("").trim();
            table = Some(name.to_owned());
            if i == line_no {
                key = table.clone();
            }
        } else if i == line_no {
            key = line.split_once('=').map(|(k, _)| {
                let k = k.trim().trim_matches('"');
                match &table {
                    Some(t) => format!("{t}.{k}"),
                    None => k.to_owned(),
                }
            });
        }
    }
    (line_no + 1, key.filter(|k| !k.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    // Only parsed: the tests look at the errors.
    #[allow(dead_code)]
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        name: Option<String>,
        port: Option<u16>,
        #[serde(default)]
        inner: Inner,
    }

    #[allow(dead_code)]
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        ttl: Option<u32>,
    }

    fn error(text: &str) -> String {
        parse::<File>(Path::new("/etc/x.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key_on_one_line() {
        let msg = error("name = \"a\"\nnmae = \"b\"\n");
        assert!(
            msg.starts_with("config file /etc/x.toml, line 2, key `nmae`: unknown field `nmae`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn bad_value_in_a_table_names_the_dotted_key() {
        let msg = error("port = 1\n\n[inner]\nttl = \"soon\"\n");
        assert!(
            msg.starts_with("config file /etc/x.toml, line 4, key `inner.ttl`: "),
            "{msg}"
        );
        let msg = error("port = 70000\n");
        assert!(msg.contains("line 1, key `port`"), "{msg}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let msg = error("name = \"a\"\nport = \n");
        assert!(msg.contains("/etc/x.toml, line 2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn missing_file_is_empty_only_when_asked() {
        let missing = Path::new("/nonexistent/overlay-test.toml");
        let file: File = load_if_present(missing).unwrap();
        assert!(file.name.is_none());
        let err = load::<File>(missing).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read config file /nonexistent/overlay-test.toml"),
            "{err}"
        );
    }

    #[test]
    fn bad_key_is_placed_in_the_file_when_there_is_one() {
        let e = ConfigError::bad_key(Some(Path::new("c.toml")), "turn.ttl", "too short");
        assert_eq!(
            e.to_string(),
            "config file c.toml, key `turn.ttl`: too short"
        );
        let e = ConfigError::bad_key(None, "turn.ttl", "too short");
        assert_eq!(e.to_string(), "`turn.ttl`: too short");
    }
}
