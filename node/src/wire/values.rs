//! Values between the wire protocol's encodings and raftpg's [`SqlValue`]s.
//!
//! Owns the text and binary forms raftpg sends for result cells and how it reads bound
//! parameters. Text forms are PostgreSQL's own output for the settings a session may have
//! (`DateStyle` ISO, `TimeZone` UTC, `IntervalStyle` postgres, `bytea_output` hex; `extra_float_digits`
//! as the session sets it); binary forms are PostgreSQL's `send` formats. A parameter in text
//! form travels as [`SqlValue::PgText`] and PostgreSQL parses it as the type the statement
//! needs; one in binary form is decoded for the types raftpg has a kind of its own for.

use bytes::BytesMut;
use postgres_types::{ToSql, Type};

use crate::command::SqlValue;
use crate::pg::values::decode_numeric;

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// Why a value cannot be sent or read.
#[derive(Debug, thiserror::Error)]
pub enum WireValueError {
    /// A binary parameter of a type raftpg decodes only in text form.
    #[error("binary parameters of type {0} are not supported; send this parameter in text format")]
    BinaryParam(String),
    /// A binary parameter whose bytes are not a value of its type.
    #[error("incorrect binary data format in bind parameter {index}: {why}")]
    BadBinary {
        /// 1-based parameter number.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A parameter in text form that is not UTF-8.
    #[error("invalid byte sequence for encoding \"UTF8\" in bind parameter {0}")]
    NotUtf8(usize),
    /// A result cell that cannot be sent in binary form.
    #[error("cannot send a value of type {0} in binary format; ask for text")]
    BinaryResult(String),
    /// A result cell read in binary form that the client wants as text.
    #[error("cannot send a value of type OID {0} in text format here; ask for binary")]
    TextResult(u32),
}

/// The format code of a result or parameter: 0 text, 1 binary.
pub fn is_binary(code: i16) -> bool {
    code == 1
}

/// Formats of `n` columns (or parameters) as a Bind message gives them: none (all text), one
/// (for all), or one each.
pub fn formats_for(codes: &[i16], n: usize) -> Vec<i16> {
    match codes.len() {
        0 => vec![0; n],
        1 => vec![codes[0]; n],
        _ => codes.to_vec(),
    }
}

/// A bound parameter as a log value. `type_oid` is the parameter's type when the client gave
/// it (or PostgreSQL inferred it), 0 when unknown; `index` is 1-based, for messages.
pub fn param_value(
    raw: Option<&[u8]>,
    binary: bool,
    type_oid: u32,
    index: usize,
) -> Result<SqlValue, WireValueError> {
    let Some(raw) = raw else {
        return Ok(SqlValue::Null);
    };
    if !binary {
        let text = std::str::from_utf8(raw).map_err(|_| WireValueError::NotUtf8(index))?;
        return Ok(SqlValue::PgText {
            type_oid,
            text: text.to_string(),
        });
    }
    let bad = |why: &str| WireValueError::BadBinary {
        index,
        why: why.to_string(),
    };
    let fixed = |n: usize| -> Result<&[u8], WireValueError> {
        (raw.len() == n)
            .then_some(raw)
            .ok_or_else(|| bad(&format!("expected {n} bytes, got {}", raw.len())))
    };
    let ty = Type::from_oid(type_oid);
    let text = || -> Result<String, WireValueError> {
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| WireValueError::NotUtf8(index))
    };
    Ok(match ty {
        Some(Type::BOOL) => SqlValue::Bool(fixed(1)?[0] != 0),
        Some(Type::INT2) => SqlValue::Int64(i16::from_be_bytes(arr(fixed(2)?)).into()),
        Some(Type::INT4) => SqlValue::Int64(i32::from_be_bytes(arr(fixed(4)?)).into()),
        Some(Type::INT8) => SqlValue::Int64(i64::from_be_bytes(arr(fixed(8)?))),
        Some(Type::OID) => SqlValue::Int64(u32::from_be_bytes(arr(fixed(4)?)).into()),
        Some(Type::FLOAT4) => SqlValue::Float64(f32::from_be_bytes(arr(fixed(4)?)).into()),
        Some(Type::FLOAT8) => SqlValue::Float64(f64::from_be_bytes(arr(fixed(8)?))),
        Some(Type::NUMERIC) => {
            SqlValue::Numeric(decode_numeric(raw).map_err(|e| bad(&e.to_string()))?)
        }
        Some(Type::BYTEA) => SqlValue::Bytes(raw.to_vec()),
        Some(Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN) => {
            SqlValue::PgText {
                type_oid,
                text: text()?,
            }
        }
        Some(Type::TIMESTAMPTZ) => SqlValue::TimestamptzMicros(
            i64::from_be_bytes(arr(fixed(8)?)).saturating_add(PG_EPOCH_OFFSET_MICROS),
        ),
        Some(Type::TIMESTAMP) => SqlValue::TimestampMicros(
            i64::from_be_bytes(arr(fixed(8)?)).saturating_add(PG_EPOCH_OFFSET_MICROS),
        ),
        Some(Type::DATE) => SqlValue::DateDays(
            i32::from_be_bytes(arr(fixed(4)?)).saturating_add(PG_EPOCH_OFFSET_DAYS),
        ),
        Some(Type::UUID) => SqlValue::Uuid(uuid::Uuid::from_bytes(arr(fixed(16)?))),
        Some(Type::JSON) => SqlValue::PgText {
            type_oid,
            text: text()?,
        },
        Some(Type::JSONB) => match raw.split_first() {
            Some((1, rest)) => SqlValue::PgText {
                type_oid,
                text: std::str::from_utf8(rest)
                    .map_err(|_| WireValueError::NotUtf8(index))?
                    .to_string(),
            },
            _ => return Err(bad("unsupported jsonb version number")),
        },
        // Another built-in type: its binary form travels as is (the same on every node; the
        // bind checks that the parameter is of exactly this type).
        Some(_) => SqlValue::PgBinary {
            type_oid,
            bytes: raw.to_vec(),
        },
        None => return Err(WireValueError::BinaryParam(format!("with OID {type_oid}"))),
    })
}

fn arr<const N: usize>(raw: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&raw[..N]);
    out
}

/// How a session prints floats (PostgreSQL's `extra_float_digits`, -15..=3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextSettings {
    /// `extra_float_digits`: above 0, the shortest text that reads back exactly; otherwise
    /// `15 + extra_float_digits` significant digits (`6 + …` for float4).
    pub extra_float_digits: i32,
}

impl Default for TextSettings {
    fn default() -> Self {
        TextSettings {
            extra_float_digits: 1,
        }
    }
}

/// A result cell in text form (`None`: SQL NULL), for a column of type `type_oid`.
pub fn text_of(
    v: &SqlValue,
    type_oid: u32,
    settings: TextSettings,
) -> Result<Option<Vec<u8>>, WireValueError> {
    let s = match v {
        SqlValue::Null => return Ok(None),
        SqlValue::PgBinary { .. } => return Err(WireValueError::TextResult(type_oid)),
        SqlValue::Bool(b) => (if *b { "t" } else { "f" }).to_string(),
        SqlValue::Int64(i) => i.to_string(),
        SqlValue::Float64(f) if type_oid == Type::FLOAT4.oid() => {
            float_text(*f, true, settings.extra_float_digits)
        }
        SqlValue::Float64(f) => float_text(*f, false, settings.extra_float_digits),
        SqlValue::Numeric(s)
        | SqlValue::Text(s)
        | SqlValue::Json(s)
        | SqlValue::Jsonb(s)
        | SqlValue::PgText { text: s, .. } => return Ok(Some(s.as_bytes().to_vec())),
        SqlValue::Bytes(b) => {
            let mut out = Vec::with_capacity(2 + 2 * b.len());
            out.extend_from_slice(b"\\x");
            for x in b {
                out.extend_from_slice(format!("{x:02x}").as_bytes());
            }
            return Ok(Some(out));
        }
        SqlValue::TimestamptzMicros(t) => timestamp_text(*t, true),
        SqlValue::TimestampMicros(t) => timestamp_text(*t, false),
        SqlValue::DateDays(d) => date_text(*d),
        SqlValue::Uuid(u) => u.hyphenated().to_string(),
    };
    Ok(Some(s.into_bytes()))
}

/// A result cell in binary form (`None`: SQL NULL), for a column of type `type_oid`.
pub fn binary_of(v: &SqlValue, type_oid: u32) -> Result<Option<Vec<u8>>, WireValueError> {
    match v {
        SqlValue::Null => return Ok(None),
        SqlValue::PgBinary { bytes, .. } => return Ok(Some(bytes.clone())),
        _ => {}
    }
    let Some(ty) = Type::from_oid(type_oid) else {
        // A type created by SQL: an enum's binary form is its label.
        return match v {
            SqlValue::Text(s) => Ok(Some(s.as_bytes().to_vec())),
            _ => Err(WireValueError::BinaryResult(format!("with OID {type_oid}"))),
        };
    };
    let mut out = BytesMut::new();
    match v {
        // Types whose binary form is their text.
        SqlValue::PgText { text, .. }
            if matches!(
                ty,
                Type::TEXT
                    | Type::VARCHAR
                    | Type::NAME
                    | Type::BPCHAR
                    | Type::CHAR
                    | Type::UNKNOWN
                    | Type::JSON
            ) =>
        {
            out.extend_from_slice(text.as_bytes())
        }
        SqlValue::PgText { text, .. } if ty == Type::JSONB => {
            out.extend_from_slice(&[1]);
            out.extend_from_slice(text.as_bytes())
        }
        SqlValue::PgText { .. } => return Err(WireValueError::BinaryResult(ty.name().into())),
        _ => {
            v.to_sql(&ty, &mut out)
                .map_err(|_| WireValueError::BinaryResult(ty.name().to_string()))?;
        }
    }
    Ok(Some(out.to_vec()))
}

/// A float as PostgreSQL's `float8out`/`float4out` prints it.
pub fn float_text(f: f64, float4: bool, extra_float_digits: i32) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let (base_digits, fixed_max) = if float4 { (6, 6) } else { (15, 15) };
    if extra_float_digits > 0 {
        // Shortest text that reads back exactly; fixed notation for exponents -4..fixed_max.
        let sci = if float4 {
            format!("{:e}", f as f32)
        } else {
            format!("{f:e}")
        };
        let (neg, digits, exp) = split_sci(&sci);
        return layout(neg, &digits, exp, exp < -4 || exp >= fixed_max);
    }
    // printf("%.*g", base_digits + extra_float_digits, f).
    let precision = (base_digits + extra_float_digits).max(1) as usize;
    let sci = format!("{:.*e}", precision - 1, f);
    let (neg, digits, exp) = split_sci(&sci);
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    layout(neg, digits, exp, exp < -4 || exp >= precision as i32)
}

/// Splits Rust's `{:e}` output (`-1.2345e-7`) into sign, digits (`12345`) and exponent.
fn split_sci(s: &str) -> (bool, String, i32) {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (mantissa, exp) = s.split_once('e').unwrap_or((s, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    (neg, digits, exp.parse().unwrap_or(0))
}

/// Lays out `digits` (the first one before the point) times 10^`exp`, in exponential form
/// (`1.5e-07`, at least two exponent digits) or fixed form (`0.00015`, `1500`).
fn layout(neg: bool, digits: &str, exp: i32, exponential: bool) -> String {
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if exponential {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(digits);
            for _ in digits.len()..int_len {
                out.push('0');
            }
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
    out
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian, year 0 = 1 BC).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A date in ISO style (`2024-02-29`, `0044-03-15 BC`, `infinity`).
fn date_text(days: i32) -> String {
    if days == i32::MAX {
        return "infinity".into();
    }
    if days == i32::MIN.saturating_add(PG_EPOCH_OFFSET_DAYS) || days == i32::MIN {
        return "-infinity".into();
    }
    let (y, m, d) = civil_from_days(days.into());
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    format!("{year:04}-{m:02}-{d:02}{bc}")
}

/// A timestamp in ISO style, UTC (`2024-02-29 12:00:00.5+00` with `tz`).
fn timestamp_text(micros: i64, tz: bool) -> String {
    if micros == i64::MAX {
        return "infinity".into();
    }
    if micros == i64::MIN.saturating_add(PG_EPOCH_OFFSET_MICROS) || micros == i64::MIN {
        return "-infinity".into();
    }
    let days = micros.div_euclid(86_400_000_000);
    let in_day = micros.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    let secs = in_day / 1_000_000;
    let frac = in_day % 1_000_000;
    let mut out = format!(
        "{year:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    if frac != 0 {
        let f = format!("{frac:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    if tz {
        out.push_str("+00");
    }
    out.push_str(bc);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: SqlValue, oid: u32) -> String {
        String::from_utf8(text_of(&v, oid, TextSettings::default()).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn floats_print_as_postgresql_prints_them() {
        let f8 = |f: f64| float_text(f, false, 1);
        assert_eq!(f8(1.0), "1");
        assert_eq!(f8(-0.0), "-0");
        assert_eq!(f8(0.1), "0.1");
        assert_eq!(f8(123.456), "123.456");
        assert_eq!(f8(1e15), "1e+15");
        assert_eq!(f8(1e14), "100000000000000");
        assert_eq!(f8(1.5e-7), "1.5e-07");
        assert_eq!(f8(0.0001), "0.0001");
        assert_eq!(f8(0.00001234), "1.234e-05");
        assert_eq!(f8(1e100), "1e+100");
        assert_eq!(f8(f64::NAN), "NaN");
        assert_eq!(f8(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(float_text(0.1 + 0.2, false, 0), "0.3");
        assert_eq!(float_text(0.1 + 0.2, false, 1), "0.30000000000000004");
        assert_eq!(float_text(1e15, false, 0), "1e+15");
        assert_eq!(float_text(123456.0, false, 0), "123456");
        assert_eq!(float_text(1.1f32 as f64, true, 1), "1.1");
        assert_eq!(float_text(1234567.0f32 as f64, true, 1), "1.234567e+06");
        assert_eq!(float_text(1.1f32 as f64, true, 0), "1.1");
    }

    #[test]
    fn dates_and_times_print_in_iso_style() {
        assert_eq!(t(SqlValue::DateDays(0), 1082), "1970-01-01");
        assert_eq!(t(SqlValue::DateDays(19_782), 1082), "2024-02-29");
        assert_eq!(t(SqlValue::DateDays(-738_000), 1082), "0052-06-05 BC");
        assert_eq!(t(SqlValue::DateDays(i32::MAX), 1082), "infinity");
        assert_eq!(
            t(SqlValue::TimestamptzMicros(1_709_208_000_500_000), 1184),
            "2024-02-29 12:00:00.5+00"
        );
        assert_eq!(
            t(SqlValue::TimestampMicros(-1), 1114),
            "1969-12-31 23:59:59.999999"
        );
        assert_eq!(
            t(
                SqlValue::TimestamptzMicros(i64::MIN + PG_EPOCH_OFFSET_MICROS),
                1184
            ),
            "-infinity"
        );
    }

    #[test]
    fn other_kinds() {
        assert_eq!(t(SqlValue::Bool(true), 16), "t");
        assert_eq!(t(SqlValue::Bytes(vec![0, 255]), 17), "\\x00ff");
        assert_eq!(t(SqlValue::Int64(-5), 23), "-5");
        assert!(text_of(&SqlValue::Null, 23, TextSettings::default())
            .unwrap()
            .is_none());
        assert_eq!(
            binary_of(&SqlValue::Int64(7), Type::INT4.oid()).unwrap(),
            Some(vec![0, 0, 0, 7])
        );
    }

    #[test]
    fn parameters() {
        assert_eq!(
            param_value(Some(b"42"), false, 0, 1).unwrap(),
            SqlValue::PgText {
                type_oid: 0,
                text: "42".into()
            }
        );
        assert_eq!(
            param_value(Some(&[0, 0, 0, 42]), true, 23, 1).unwrap(),
            SqlValue::Int64(42)
        );
        assert!(param_value(Some(&[0, 42]), true, 23, 1).is_err());
        assert!(matches!(
            param_value(Some(&[0]), true, Type::INTERVAL.oid(), 1).unwrap(),
            SqlValue::PgBinary { .. }
        ));
        assert!(param_value(Some(&[0]), true, 90_000, 1).is_err());
        assert_eq!(param_value(None, true, 23, 1).unwrap(), SqlValue::Null);
    }
}
