//! Time hidden in strings: `'now'`, `'today'`, `'tomorrow'` and `'yesterday'` (design.md "Time
//! hides in strings").
//!
//! PostgreSQL reads these words as the *current transaction's start time* when a string meets
//! a date/time type — each node at its own transaction start, so copies would differ. Owns the
//! rule the leader applies to every string constant of a write:
//! - in DML, a special word cast explicitly to a date/time type (`'now'::timestamptz`,
//!   `CAST('today' AS date)`, `timestamptz 'now'`) is rewritten to raftpg's deterministic
//!   clock (`raftpg.now()`, the entry's timestamp), with the same meaning;
//! - anywhere else (an implicit conversion into a column — raftpg cannot see column types — a
//!   `DEFAULT 'now'`, which PostgreSQL evaluates once at table creation, views, arrays, ranges,
//!   function bodies) it is refused, with what to write instead.
//!
//! Only strings that *are* such a time (the word alone, or with a time of day, or as an
//! element of an array/range literal) count; `'see you tomorrow'` is ordinary text.

/// The special words and their deterministic equivalent (a `timestamptz` expression).
const WORDS: &[(&str, &str)] = &[
    ("now", "raftpg.now()"),
    ("today", "date_trunc('day', raftpg.now())"),
    (
        "tomorrow",
        "(date_trunc('day', raftpg.now()) + interval '1 day')",
    ),
    (
        "yesterday",
        "(date_trunc('day', raftpg.now()) - interval '1 day')",
    ),
];

/// Date/time types a special word can be cast to and be rewritten (names as the parser gives
/// them, without `pg_catalog.`).
const TIME_TYPES: &[&str] = &["timestamptz", "timestamp", "date", "time", "timetz"];

/// Whether a piece of a string is time-of-day-like (`10:00`, `10:00:01.5+02`, `pm`, `utc`).
fn time_of_day_like(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty()
        && (s.chars().any(|c| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_digit() || " :.+-apmAPMzZ".contains(c))
            || matches!(s.to_ascii_lowercase().as_str(), "utc" | "z" | "am" | "pm"))
}

/// The special word a string consists of, if it is exactly one (case-insensitive, surrounding
/// spaces ignored).
pub fn exact_word(s: &str) -> Option<&'static str> {
    let t = s.trim().to_ascii_lowercase();
    WORDS.iter().map(|(w, _)| *w).find(|w| *w == t)
}

/// Whether a string would be read as the current time by a date/time input function: a
/// special word alone, with a time of day before or after it, or as an element of an
/// array/range/row literal.
pub fn is_time_string(s: &str) -> bool {
    if exact_word(s).is_some() {
        return true;
    }
    let lower = s.trim().to_ascii_lowercase();
    for (w, _) in WORDS {
        if let Some(rest) = lower.strip_prefix(w) {
            if rest.starts_with(' ') && time_of_day_like(rest) {
                return true;
            }
        }
        if let Some(rest) = lower.strip_suffix(w) {
            if rest.ends_with(' ') && time_of_day_like(rest) {
                return true;
            }
        }
    }
    // Array, range and row literals: {now,...}, [today,tomorrow), ("now").
    if lower.starts_with(['{', '[', '(']) {
        return lower
            .split(|c: char| "{}[](),\"".contains(c))
            .any(|part| !part.trim().is_empty() && is_time_string(part));
    }
    false
}

/// The deterministic expression for a string cast explicitly to `type_name`, if the string is
/// exactly a special word and the type a plain date/time type.
pub fn rewrite(s: &str, type_name: &str, is_array: bool) -> Option<&'static str> {
    if is_array || !TIME_TYPES.contains(&type_name) {
        return None;
    }
    let word = exact_word(s)?;
    WORDS.iter().find(|(w, _)| *w == word).map(|(_, e)| *e)
}

/// The message of a refusal for a time string outside an explicit cast.
pub fn refusal_message(s: &str) -> String {
    format!(
        "the string '{}' is read as the current time when it meets a date/time type, at each node's own transaction start, so copies would differ; use now(), CURRENT_DATE, CURRENT_DATE + 1 or CURRENT_DATE - 1 instead (in a column DEFAULT too: DEFAULT now()), cast the string explicitly in a query ('now'::timestamptz), or bind the text as a parameter if you meant the word itself",
        s.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_time_strings_only() {
        for s in [
            "now",
            " NOW ",
            "today",
            "Tomorrow",
            "yesterday",
            "today 10:00",
            "tomorrow 10:00:00+02",
            "10:00 tomorrow",
            "{now}",
            "[today,tomorrow)",
            "{\"2020-01-01\", now}",
        ] {
            assert!(is_time_string(s), "{s}");
        }
        for s in [
            "see you tomorrow",
            "nowhere",
            "today is a good day",
            "",
            "2020-01-01",
            "{a,b}",
            "now and then",
        ] {
            assert!(!is_time_string(s), "{s}");
        }
    }

    #[test]
    fn rewrites_explicit_casts_to_time_types() {
        assert_eq!(rewrite("now", "timestamptz", false), Some("raftpg.now()"));
        assert!(rewrite("today", "date", false)
            .unwrap()
            .contains("date_trunc"));
        assert_eq!(rewrite("now", "text", false), None);
        assert_eq!(rewrite("now", "timestamptz", true), None);
        assert_eq!(rewrite("today 10:00", "timestamp", false), None);
    }
}
