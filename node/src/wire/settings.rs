//! A wire session's settings: what a client may `SET` (or send at startup), the values it
//! `SHOW`s, and the ones reported to it in `ParameterStatus` messages.
//!
//! Owns the session's read consistency (`raftpg.read_consistency`, linearizable by default),
//! the log index of its last write (`raftpg.last_write_index`: every read of the session waits
//! for it, on whatever node, so a session reads its own writes), its read timeout
//! (`statement_timeout`) and how it prints floats. A setting raftpg cannot honour is refused
//! with an error naming it, never accepted and ignored: the session's queries and writes run
//! with PostgreSQL's default output styles (`DateStyle` ISO, `TimeZone` UTC, `IntervalStyle`
//! postgres) and the `public` schema, the same on every node.

use std::collections::BTreeMap;

use crate::service::{Consistency, ErrorKind, ServiceError, SESSION_SETTINGS};

use super::values::TextSettings;

/// A setting's rule: its name as PostgreSQL spells it, its start value, whether clients are
/// told of changes (`GUC_REPORT`).
struct Rule {
    name: &'static str,
    default: &'static str,
    reported: bool,
}

const RULES: &[Rule] = &[
    Rule {
        name: "application_name",
        default: "",
        reported: true,
    },
    Rule {
        name: "client_encoding",
        default: "UTF8",
        reported: true,
    },
    Rule {
        name: "DateStyle",
        default: "ISO, MDY",
        reported: true,
    },
    Rule {
        name: "IntervalStyle",
        default: "postgres",
        reported: true,
    },
    Rule {
        name: "TimeZone",
        default: "UTC",
        reported: true,
    },
    Rule {
        name: "standard_conforming_strings",
        default: "on",
        reported: true,
    },
    Rule {
        name: "integer_datetimes",
        default: "on",
        reported: true,
    },
    Rule {
        name: "server_encoding",
        default: "UTF8",
        reported: true,
    },
    Rule {
        name: "default_transaction_read_only",
        default: "off",
        reported: true,
    },
    Rule {
        name: "in_hot_standby",
        default: "off",
        reported: true,
    },
    Rule {
        name: "is_superuser",
        default: "off",
        reported: true,
    },
    Rule {
        name: "extra_float_digits",
        default: "1",
        reported: false,
    },
    Rule {
        name: "search_path",
        default: "public",
        reported: false,
    },
    Rule {
        name: "statement_timeout",
        default: "0",
        reported: false,
    },
    Rule {
        name: "client_min_messages",
        default: "notice",
        reported: false,
    },
    Rule {
        name: "bytea_output",
        default: "hex",
        reported: false,
    },
    Rule {
        name: READ_CONSISTENCY,
        default: "linearizable",
        reported: false,
    },
    Rule {
        name: ALLOW_DIVERGED_READS,
        default: "off",
        reported: false,
    },
    Rule {
        name: TRANSACTION_ID,
        default: "",
        reported: false,
    },
];

/// The id of the session's next interactive transaction (its request id, see
/// `service::txn`), taken by its `BEGIN`: a client that lost the answer to `COMMIT` (08007)
/// sets the same id and begins again, and learns that it committed (RP003) or runs it again.
pub const TRANSACTION_ID: &str = "raftpg.transaction_id";

/// Whether the session reads a node whose copy a check found different (`off` by default; see
/// `service::repair`).
pub const ALLOW_DIVERGED_READS: &str = "raftpg.allow_diverged_reads";

/// The session's read consistency setting.
pub const READ_CONSISTENCY: &str = "raftpg.read_consistency";
/// The (read-only) log index of the session's last write.
pub const LAST_WRITE_INDEX: &str = "raftpg.last_write_index";

/// The read consistency a session asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadLevel {
    /// A read index confirmed by the leader's quorum (the default).
    Linearizable,
    /// Whatever this node holds (but at least the session's own last write).
    Local,
    /// At least this log index (and the session's own last write).
    AtLeast(u64),
}

/// A session's settings. See the module doc.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Current values by their PostgreSQL name.
    values: BTreeMap<&'static str, String>,
    /// The values at startup, for `RESET`.
    start: BTreeMap<&'static str, String>,
    read_level: ReadLevel,
    last_write_index: u64,
    statement_timeout_ms: u32,
    text: TextSettings,
}

fn rule(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.name.eq_ignore_ascii_case(name))
}

/// A refusal of a setting (SQLSTATE 22023 for a bad value, 0A000 for one raftpg cannot honour).
fn refuse(sqlstate: &str, message: String, hint: &str) -> ServiceError {
    let kind = match sqlstate {
        "0A000" => ErrorKind::Unsupported,
        _ => ErrorKind::InvalidArgument,
    };
    ServiceError {
        hint: hint.to_string(),
        ..ServiceError::refused(kind, sqlstate, message)
    }
}

fn invalid(name: &str, value: &str) -> ServiceError {
    refuse(
        "22023",
        format!("invalid value for parameter \"{name}\": \"{value}\""),
        "",
    )
}

impl Settings {
    /// The settings of a new session of `user`, with the server's version.
    pub fn new(user: &str, server_version: &str) -> Self {
        let mut values: BTreeMap<&'static str, String> = RULES
            .iter()
            .map(|r| (r.name, r.default.to_string()))
            .collect();
        values.insert("session_authorization", user.to_string());
        values.insert("server_version", server_version.to_string());
        Settings {
            start: values.clone(),
            values,
            read_level: ReadLevel::Linearizable,
            last_write_index: 0,
            statement_timeout_ms: 0,
            text: TextSettings::default(),
        }
    }

    /// Applies a startup parameter (as `SET`, and the value becomes the one `RESET` returns to).
    pub fn startup(&mut self, name: &str, value: &str) -> Result<(), ServiceError> {
        self.set(name, Some(value))?;
        if let Some(r) = rule(name) {
            if let Some(v) = self.values.get(r.name) {
                self.start.insert(r.name, v.clone());
            }
        }
        Ok(())
    }

    /// `SET name TO value` (`None`: `RESET name`). Returns the setting's name and new value
    /// when clients are told of it (a `ParameterStatus` to send).
    pub fn set(
        &mut self,
        name: &str,
        value: Option<&str>,
    ) -> Result<Option<(String, String)>, ServiceError> {
        if name.eq_ignore_ascii_case(LAST_WRITE_INDEX) {
            return Err(refuse(
                "55P02",
                format!("parameter \"{LAST_WRITE_INDEX}\" cannot be changed"),
                "",
            ));
        }
        let Some(r) = rule(name) else {
            return Err(refuse(
                "0A000",
                format!("raftpg does not support setting \"{name}\" in a session"),
                "Settings that change what a statement does must be the same on every node: put SET LOCAL in the write's own statements, or qualify names instead of changing search_path.",
            ));
        };
        let value = match value {
            Some(v) => self.checked(r, v.trim())?,
            None => self.start.get(r.name).cloned().unwrap_or_default(),
        };
        self.apply(r.name, &value);
        self.values.insert(r.name, value.clone());
        Ok(r.reported.then(|| (r.name.to_string(), value)))
    }

    /// `RESET ALL`: every setting back to its start value; returns the reported ones.
    pub fn reset_all(&mut self) -> Vec<(String, String)> {
        let start = self.start.clone();
        let mut changed = Vec::new();
        for (name, v) in start {
            if self.values.get(name) != Some(&v) {
                if rule(name).is_some_and(|r| r.reported) {
                    changed.push((name.to_string(), v.clone()));
                }
                self.apply(name, &v);
                self.values.insert(name, v);
            }
        }
        changed
    }

    /// Goes back to the values of `saved` (an earlier copy of these settings: a transaction
    /// block rolled back to its start or to a savepoint, as PostgreSQL undoes the `SET`s made
    /// since), except the session's last write, which only grows; returns the reported ones
    /// that changed.
    pub fn restore(&mut self, saved: &Settings) -> Vec<(String, String)> {
        let changed = saved
            .values
            .iter()
            .filter(|(k, v)| self.values.get(*k) != Some(*v))
            .filter(|(k, _)| rule(k).is_some_and(|r| r.reported))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let last_write_index = self.last_write_index;
        *self = saved.clone();
        self.last_write_index = self.last_write_index.max(last_write_index);
        changed
    }

    /// The value a transaction's session runs with for `name`, one of [`SESSION_SETTINGS`]:
    /// `None` when it is raftpg's fixed one (see [`Settings::overrides`]).
    pub fn override_of(&self, name: &str) -> Option<String> {
        let key = SESSION_SETTINGS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(name))?;
        let value = self.values.get(key)?;
        let default = rule(key).map_or("", |r| r.default);
        (!same_setting(key, value, default)).then(|| value.clone())
    }

    /// Whether the session's reads may read a copy known to differ.
    pub fn allow_diverged_reads(&self) -> bool {
        self.values
            .get(ALLOW_DIVERGED_READS)
            .is_some_and(|v| v == "on")
    }

    /// The value `SHOW name` answers, when the session owns the setting.
    pub fn show(&self, name: &str) -> Option<(String, String)> {
        if name.eq_ignore_ascii_case(LAST_WRITE_INDEX) {
            return Some((LAST_WRITE_INDEX.into(), self.last_write_index.to_string()));
        }
        let key = self.values.keys().find(|k| k.eq_ignore_ascii_case(name))?;
        Some((key.to_string(), self.values[key].clone()))
    }

    /// The settings reported to the client at startup.
    pub fn reported(&self) -> Vec<(String, String)> {
        self.values
            .iter()
            .filter(|(k, _)| {
                rule(k).is_some_and(|r| r.reported)
                    || **k == "session_authorization"
                    || **k == "server_version"
            })
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// The id set for the next transaction (see [`TRANSACTION_ID`]), now cleared.
    pub fn take_transaction_id(&mut self) -> Option<String> {
        let v = self.values.insert(TRANSACTION_ID, String::new())?;
        (!v.is_empty()).then_some(v)
    }

    /// Records the session's write at `index`.
    pub fn wrote(&mut self, index: u64) {
        self.last_write_index = self.last_write_index.max(index);
    }

    /// The log index of the session's last write.
    pub fn last_write_index(&self) -> u64 {
        self.last_write_index
    }

    /// The consistency of the session's next read: its own level, and at least its last write.
    pub fn consistency(&self) -> Consistency {
        let own = self.last_write_index;
        match self.read_level {
            ReadLevel::Linearizable => Consistency::Linearizable,
            ReadLevel::Local if own == 0 => Consistency::Local,
            ReadLevel::Local => Consistency::AtLeast(own),
            ReadLevel::AtLeast(i) => Consistency::AtLeast(i.max(own)),
        }
    }

    /// The session's bound on a read, in milliseconds (0: the node's).
    pub fn statement_timeout_ms(&self) -> u32 {
        self.statement_timeout_ms
    }

    /// How the session prints values.
    pub fn text(&self) -> TextSettings {
        self.text
    }

    /// Whether `name` is a setting PostgreSQL must check (and the session's reads and writes
    /// then run with): see [`SESSION_SETTINGS`].
    pub fn checked_by_postgres(name: &str) -> bool {
        SESSION_SETTINGS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name))
    }

    /// The session settings that differ from raftpg's fixed ones, with their values: what the
    /// session's reads set in their transaction and its writes set with `SET LOCAL`.
    pub fn overrides(&self) -> Vec<(String, String)> {
        SESSION_SETTINGS
            .iter()
            .filter_map(|name| {
                let value = self.values.get(name)?;
                let default = rule(name).map_or("", |r| r.default);
                (!same_setting(name, value, default)).then(|| (name.to_string(), value.clone()))
            })
            .collect()
    }

    /// Checks `value` for setting `r` and returns it as it will be shown.
    fn checked(&self, r: &Rule, value: &str) -> Result<String, ServiceError> {
        let unsupported = |hint: &str| {
            refuse(
                "0A000",
                format!("raftpg does not support {} = '{value}' yet", r.name),
                hint,
            )
        };
        let lower = value.to_ascii_lowercase();
        Ok(match r.name {
            "application_name" => value.chars().take(63).collect(),
            "client_encoding" => match lower.as_str() {
                "utf8" | "utf-8" | "unicode" => "UTF8".into(),
                "sql_ascii" => "SQL_ASCII".into(),
                _ => {
                    return Err(unsupported(
                        "raftpg sends and receives UTF8 only; set client_encoding to UTF8",
                    ))
                }
            },
            // Checked by PostgreSQL (the session asks it before it sets them).
            "DateStyle" | "IntervalStyle" | "TimeZone" | "bytea_output" => value.to_string(),
            "standard_conforming_strings" if matches!(lower.as_str(), "on" | "true" | "1") => {
                "on".into()
            }
            "standard_conforming_strings" => {
                return Err(unsupported(
                    "raftpg reads string literals with standard_conforming_strings = on",
                ))
            }
            "integer_datetimes" | "server_encoding" | "in_hot_standby" | "is_superuser" => {
                return Err(refuse(
                    "55P02",
                    format!("parameter \"{}\" cannot be changed", r.name),
                    "",
                ));
            }
            "default_transaction_read_only" if matches!(lower.as_str(), "off" | "false" | "0") => {
                "off".into()
            }
            "default_transaction_read_only" => {
                return Err(unsupported("a read-only session: send only queries"))
            }
            "extra_float_digits" => match value.parse::<i32>() {
                Ok(n) if (-15..=3).contains(&n) => n.to_string(),
                _ => return Err(invalid(r.name, value)),
            },
            "search_path" if lower.contains("raftpg") => {
                return Err(refuse(
                    "42501",
                    "raftpg's own schema cannot be on a session's search_path".into(),
                    "",
                ))
            }
            "search_path" => match search_path_idents(value) {
                Some(v) if !v.is_empty() => value.to_string(),
                _ => return Err(invalid(r.name, value)),
            },
            "statement_timeout" => parse_duration_ms(value)
                .ok_or_else(|| invalid(r.name, value))?
                .to_string(),
            "client_min_messages" => match lower.as_str() {
                "debug5" | "debug4" | "debug3" | "debug2" | "debug1" | "debug" | "log"
                | "notice" | "warning" | "error" | "info" => lower,
                _ => return Err(invalid(r.name, value)),
            },
            TRANSACTION_ID if value.len() > 200 => return Err(invalid(r.name, value)),
            ALLOW_DIVERGED_READS => match lower.as_str() {
                "on" | "true" | "yes" | "1" => "on".to_string(),
                "off" | "false" | "no" | "0" => "off".to_string(),
                _ => return Err(invalid(r.name, value)),
            },
            READ_CONSISTENCY => {
                parse_level(&lower).ok_or_else(|| {
                    refuse(
                        "22023",
                        format!("invalid value for parameter \"{READ_CONSISTENCY}\": \"{value}\""),
                        "Available values: linearizable, local, at_least:<log index>.",
                    )
                })?;
                lower
            }
            _ => value.to_string(),
        })
    }

    /// Makes the session follow a new value of `name`.
    fn apply(&mut self, name: &str, value: &str) {
        match name {
            READ_CONSISTENCY => {
                if let Some(l) = parse_level(value) {
                    self.read_level = l;
                }
            }
            "statement_timeout" => {
                self.statement_timeout_ms = value.parse().unwrap_or(0);
            }
            "extra_float_digits" => {
                self.text.extra_float_digits = value.parse().unwrap_or(1);
            }
            _ => {}
        }
    }
}

/// The schemas of a `search_path` value, each as a quoted identifier (`game, "Big"` →
/// `"game"`, `"Big"`); `None` when it is not a list of names.
pub fn search_path_idents(value: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = value.trim();
    while !rest.is_empty() {
        let (name, after) = if let Some(q) = rest.strip_prefix('"') {
            let mut name = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if q[i + 1..].starts_with('"') {
                        name.push('"');
                        chars.next();
                        continue;
                    }
                    end = Some(i + 1);
                    break;
                }
                name.push(c);
            }
            (name, &q[end?..])
        } else {
            let end = rest
                .find(|c: char| c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            let word = &rest[..end];
            let valid = word
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && word
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
            if !valid {
                return None;
            }
            (word.to_lowercase(), &rest[end..])
        };
        if name.is_empty() || name.len() > 63 {
            return None;
        }
        out.push(format!("\"{}\"", name.replace('"', "\"\"")));
        let after = after.trim_start();
        rest = match after.strip_prefix(',') {
            Some(r) => r.trim_start(),
            None if after.is_empty() => after,
            None => return None,
        };
    }
    Some(out)
}

/// Whether two values of setting `name` mean the same (spellings of UTC, of the ISO style).
fn same_setting(name: &str, a: &str, b: &str) -> bool {
    let norm = |v: &str| {
        let v = v.trim().to_ascii_lowercase().replace(' ', "");
        match (name, v.as_str()) {
            (
                "TimeZone",
                "utc" | "etc/utc" | "gmt" | "etc/gmt" | "z" | "zulu" | "uct" | "universal",
            ) => "utc".to_string(),
            ("DateStyle", "iso" | "iso,mdy" | "mdy,iso" | "iso,us") => "iso,mdy".to_string(),
            ("search_path", "public" | "\"public\"") => "public".to_string(),
            _ => v,
        }
    };
    norm(a) == norm(b)
}

fn parse_level(v: &str) -> Option<ReadLevel> {
    match v {
        "linearizable" => Some(ReadLevel::Linearizable),
        "local" => Some(ReadLevel::Local),
        _ => v
            .strip_prefix("at_least:")
            .and_then(|i| i.trim().parse().ok())
            .map(ReadLevel::AtLeast),
    }
}

/// A duration as PostgreSQL's time settings read it: milliseconds, or a number with a unit
/// (`us`, `ms`, `s`, `min`, `h`, `d`). At most `u32::MAX` ms.
fn parse_duration_ms(v: &str) -> Option<u32> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "us" => 0.001,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = (n * factor).round();
    (0.0..=f64::from(u32::MAX))
        .contains(&ms)
        .then_some(ms as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_follows_own_writes() {
        let mut s = Settings::new("alice", "15.0");
        assert_eq!(s.consistency(), Consistency::Linearizable);
        s.set(READ_CONSISTENCY, Some("local")).unwrap();
        assert_eq!(s.consistency(), Consistency::Local);
        s.wrote(42);
        assert_eq!(s.consistency(), Consistency::AtLeast(42));
        s.set("raftpg.read_consistency", Some("at_least:7"))
            .unwrap();
        assert_eq!(s.consistency(), Consistency::AtLeast(42));
        s.set("raftpg.read_consistency", Some("at_least:70"))
            .unwrap();
        assert_eq!(s.consistency(), Consistency::AtLeast(70));
        assert!(s.set(READ_CONSISTENCY, Some("eventual")).is_err());
        assert_eq!(s.show(LAST_WRITE_INDEX).unwrap().1, "42");
        assert!(s.set(LAST_WRITE_INDEX, Some("1")).is_err());
        s.set(READ_CONSISTENCY, None).unwrap();
        assert_eq!(s.consistency(), Consistency::Linearizable);
    }

    #[test]
    fn settings_raftpg_cannot_honour_are_refused() {
        let mut s = Settings::new("alice", "15.0");
        assert_eq!(
            s.set("DateStyle", Some("ISO, MDY")).unwrap(),
            Some(("DateStyle".into(), "ISO, MDY".into()))
        );
        assert!(s.overrides().is_empty());
        // PostgreSQL checks these values (the session asks it first); the session's reads
        // and writes then run with them.
        assert!(s.set("TimeZone", Some("Europe/Paris")).is_ok());
        assert!(s.set("timezone", Some("UTC")).is_ok());
        assert!(s.overrides().is_empty());
        s.set("TimeZone", Some("Asia/Tokyo")).unwrap();
        s.set("search_path", Some("game, public")).unwrap();
        assert_eq!(
            s.overrides(),
            vec![
                ("TimeZone".to_string(), "Asia/Tokyo".to_string()),
                ("search_path".to_string(), "game, public".to_string())
            ]
        );
        assert!(s.set("search_path", Some("raftpg, public")).is_err());
        assert!(s.set("search_path", Some("a; DROP TABLE t")).is_err());
        assert_eq!(
            search_path_idents("game, \"$user\", \"Big \"\"x\"\"\", Public").unwrap(),
            ["\"game\"", "\"$user\"", "\"Big \"\"x\"\"\"", "\"public\""]
        );
        assert!(s.set("work_mem", Some("1GB")).is_err());
        s.set("statement_timeout", Some("1.5s")).unwrap();
        assert_eq!(s.statement_timeout_ms(), 1500);
        s.set("extra_float_digits", Some("3")).unwrap();
        assert_eq!(s.text().extra_float_digits, 3);
        assert!(s.set("extra_float_digits", Some("4")).is_err());
        s.set("application_name", Some("game")).unwrap();
        let reset = s.reset_all();
        assert!(reset.contains(&("application_name".into(), String::new())));
        assert_eq!(s.statement_timeout_ms(), 0);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("100"), Some(100));
        assert_eq!(parse_duration_ms("2min"), Some(120_000));
        assert_eq!(parse_duration_ms("5 s"), Some(5_000));
        assert_eq!(parse_duration_ms("x"), None);
    }
}
