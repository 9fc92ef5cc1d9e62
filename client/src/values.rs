//! Building typed values for parameters and printing result values.

use raftpg_proto::v1::value::Kind;
use raftpg_proto::v1::Value;

/// SQL NULL.
pub fn null() -> Value {
    Value {
        kind: Some(Kind::Null(true)),
    }
}
/// A bigint (also binds to int2/int4/numeric/float).
pub fn int(v: i64) -> Value {
    Value {
        kind: Some(Kind::Int64(v)),
    }
}
/// A double precision value.
pub fn float(v: f64) -> Value {
    Value {
        kind: Some(Kind::Float64(v)),
    }
}
/// A text value.
pub fn text(v: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::Text(v.into())),
    }
}
/// A boolean.
pub fn boolean(v: bool) -> Value {
    Value {
        kind: Some(Kind::Bool(v)),
    }
}
/// A numeric from decimal text.
pub fn numeric(v: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::Numeric(v.into())),
    }
}
/// A bytea.
pub fn bytes(v: impl Into<Vec<u8>>) -> Value {
    Value {
        kind: Some(Kind::Bytes(v.into())),
    }
}
/// A uuid from text.
pub fn uuid(v: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::Uuid(v.into())),
    }
}
/// A jsonb from JSON text.
pub fn jsonb(v: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::Jsonb(v.into())),
    }
}

/// Parses a CLI parameter `type:value` (`int:5`, `text:bob`, `null`, `bool:true`, `float:1.5`,
/// `numeric:1.20`, `uuid:…`, `json:{…}`, `jsonb:{…}`, `bytes:<hex>`, `tsz:<micros>`,
/// `date:<days since 1970-01-01>`). A value without a type is text.
pub fn parse_param(s: &str) -> Result<Value, String> {
    if s == "null" {
        return Ok(null());
    }
    let Some((ty, v)) = s.split_once(':') else {
        return Ok(text(s));
    };
    let bad = |e: &dyn std::fmt::Display| format!("parameter {s:?}: {e}");
    Ok(match ty {
        "int" => int(v.parse().map_err(|e| bad(&e))?),
        "float" => float(v.parse().map_err(|e| bad(&e))?),
        "bool" => boolean(v.parse().map_err(|e| bad(&e))?),
        "numeric" => numeric(v),
        "text" => text(v),
        "uuid" => uuid(v),
        "json" => Value {
            kind: Some(Kind::Json(v.into())),
        },
        "jsonb" => jsonb(v),
        "bytes" => {
            if v.len() % 2 != 0 {
                return Err(bad(&"hex needs an even number of digits"));
            }
            let b = (0..v.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&v[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| bad(&e))?;
            bytes(b)
        }
        "tsz" => Value {
            kind: Some(Kind::TimestamptzMicros(v.parse().map_err(|e| bad(&e))?)),
        },
        "date" => Value {
            kind: Some(Kind::DateDays(v.parse().map_err(|e| bad(&e))?)),
        },
        _ => text(s),
    })
}

/// A value as text for display.
pub fn display(v: &Value) -> String {
    match &v.kind {
        None | Some(Kind::Null(_)) => "NULL".into(),
        Some(Kind::Bool(b)) => b.to_string(),
        Some(Kind::Int64(i)) => i.to_string(),
        Some(Kind::Float64(f)) => f.to_string(),
        Some(Kind::Numeric(s))
        | Some(Kind::Text(s))
        | Some(Kind::Uuid(s))
        | Some(Kind::Json(s))
        | Some(Kind::Jsonb(s)) => s.clone(),
        Some(Kind::Bytes(b)) => format!(
            "\\x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
        Some(Kind::TimestamptzMicros(t)) => format!("{t}µs"),
        Some(Kind::TimestampMicros(t)) => format!("{t}µs"),
        Some(Kind::DateDays(d)) => format!("day {d}"),
        Some(Kind::PgText(t)) => t.text.clone(),
        Some(Kind::PgBinary(b)) => format!(
            "\\x{} (binary, type {})",
            b.data
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
            b.type_oid
        ),
    }
}

/// The value as i64, if it is an integer.
pub fn as_i64(v: &Value) -> Option<i64> {
    match v.kind {
        Some(Kind::Int64(i)) => Some(i),
        _ => None,
    }
}

/// The value as text, if it is text-like.
pub fn as_str(v: &Value) -> Option<&str> {
    match &v.kind {
        Some(Kind::Text(s))
        | Some(Kind::Numeric(s))
        | Some(Kind::Uuid(s))
        | Some(Kind::Json(s))
        | Some(Kind::Jsonb(s)) => Some(s),
        Some(Kind::PgText(t)) => Some(&t.text),
        _ => None,
    }
}
