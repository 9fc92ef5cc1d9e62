//! Result columns of every type. raftpg decodes the types it has a kind of its own for
//! ([`Cell`]: integers, floats, numeric, text, bytea, timestamps, dates, uuid, json); every
//! other column comes back in PostgreSQL's own text form ([`SqlValue::PgText`], made by the
//! type's output function inside the same query) or, where the caller asks and the value stays
//! on this node, in PostgreSQL's binary form ([`SqlValue::PgBinary`]).
//!
//! Owns the rewrite that asks PostgreSQL for text: a query `S` becomes
//! `SELECT … FROM (S) AS raftpg_q(c1, …)` and a data-modifying statement with `RETURNING`
//! becomes `WITH raftpg_q(c1, …) AS (S) SELECT … FROM raftpg_q`, where each column to print is
//! `CASE WHEN num_nulls(c) = 0 THEN format('%s', c) END` (the output function of its type;
//! `num_nulls` tells a NULL from a row of NULLs). The rewrite depends only on the statement and
//! its result types, the same on every node, and the text is printed with the session's fixed
//! settings, so a write's outcome is the same on every node.

use postgres_types::{FromSql, Type};
use tokio_postgres::Row;

use crate::command::{ColumnInfo, SqlValue};
use crate::pg::values::{self, Cell};

/// How a result column comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Decoded into raftpg's own kind for its type.
    Native,
    /// In PostgreSQL's text form, printed by the query itself.
    Text,
    /// In PostgreSQL's binary form (only for values that stay on this node: reads).
    Binary,
}

/// Whether raftpg has a kind of its own for values of `ty`.
pub fn is_native(ty: &Type) -> bool {
    values::check_result_type(ty).is_ok()
}

/// A raw result cell: PostgreSQL's binary bytes, whatever the type.
struct RawCell(Option<Vec<u8>>);

impl<'a> FromSql<'a> for RawCell {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawCell(Some(raw.to_vec())))
    }

    fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawCell(None))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Decodes one row of a statement run with `forms` (the text-wrapped statement when any
/// form is [`Form::Text`]); `columns` are the original statement's columns.
pub fn decode_row(
    row: &Row,
    forms: &[Form],
    columns: &[ColumnInfo],
) -> Result<Vec<SqlValue>, String> {
    let mut out = Vec::with_capacity(forms.len());
    for (i, form) in forms.iter().enumerate() {
        let oid = columns.get(i).map_or(0, |c| c.type_oid);
        let v = match form {
            Form::Native => row.try_get::<_, Cell>(i).map_err(|e| e.to_string())?.0,
            Form::Text => match row
                .try_get::<_, Option<String>>(i)
                .map_err(|e| e.to_string())?
            {
                Some(text) => SqlValue::PgText {
                    type_oid: oid,
                    text,
                },
                None => SqlValue::Null,
            },
            Form::Binary => match row.try_get::<_, RawCell>(i).map_err(|e| e.to_string())?.0 {
                Some(bytes) => SqlValue::PgBinary {
                    type_oid: oid,
                    bytes,
                },
                None => SqlValue::Null,
            },
        };
        out.push(v);
    }
    Ok(out)
}

/// The statement that runs `sql` and prints column `i` as text where `text[i]` (the others as
/// they are); `None` when `sql` is not a query or a data-modifying statement with
/// `RETURNING` (its columns then cannot be printed this way).
pub fn text_wrapped(sql: &str, text: &[bool]) -> Option<String> {
    let parsed = pg_query::parse(sql, 0).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let start = usize::try_from(raw.stmt_location).ok()?;
    let end = match usize::try_from(raw.stmt_len).ok()? {
        0 => sql.len(),
        n => start + n,
    };
    let body = sql.get(start..end)?.trim().trim_end_matches(';');
    let names: Vec<String> = (1..=text.len()).map(|i| format!("c{i}")).collect();
    let exprs: Vec<String> = names
        .iter()
        .zip(text)
        .map(|(c, t)| match t {
            true => format!(
                "CASE WHEN pg_catalog.num_nulls(raftpg_q.{c}) = 0 THEN pg_catalog.format('%s', raftpg_q.{c}) END"
            ),
            false => format!("raftpg_q.{c}"),
        })
        .collect();
    let (exprs, names) = (exprs.join(", "), names.join(", "));
    use pg_query::protobuf::node::Node as N;
    match raw.stmt.as_ref()?.node.as_ref()? {
        N::SelectStmt(_) => Some(format!(
            "SELECT {exprs} FROM (\n{body}\n) AS raftpg_q({names})"
        )),
        N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) => Some(format!(
            "WITH raftpg_q({names}) AS (\n{body}\n) SELECT {exprs} FROM raftpg_q"
        )),
        _ => None,
    }
}

/// The forms of columns of `types` when every column raftpg cannot decode is printed as text,
/// and so is every column whose text depends on one of the `settings` changed from the
/// fixed ones (raftpg prints its own kinds in UTC, ISO style, bytea as hex).
pub fn text_forms(types: &[Type], settings: &[&str]) -> Vec<Form> {
    let changed = |name: &str| settings.iter().any(|s| s.eq_ignore_ascii_case(name));
    types
        .iter()
        .map(|t| {
            let printed_by_settings = match *t {
                Type::TIMESTAMPTZ => changed("TimeZone") || changed("DateStyle"),
                Type::TIMESTAMP | Type::DATE => changed("DateStyle"),
                Type::BYTEA => changed("bytea_output"),
                _ => false,
            };
            match is_native(t) && !printed_by_settings {
                true => Form::Native,
                false => Form::Text,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_queries_and_returning() {
        assert_eq!(
            text_wrapped("SELECT 1, '1 day'::interval;", &[false, true]).unwrap(),
            "SELECT raftpg_q.c1, CASE WHEN pg_catalog.num_nulls(raftpg_q.c2) = 0 THEN pg_catalog.format('%s', raftpg_q.c2) END FROM (\nSELECT 1, '1 day'::interval\n) AS raftpg_q(c1, c2)"
        );
        let w = text_wrapped("INSERT INTO t VALUES (1) RETURNING span -- c", &[true]).unwrap();
        assert!(w.starts_with(
            "WITH raftpg_q(c1) AS (\nINSERT INTO t VALUES (1) RETURNING span -- c\n)"
        ));
        assert!(text_wrapped("CALL p()", &[true]).is_none());
        assert!(text_wrapped("SELECT 1; SELECT 2", &[true]).is_none());
    }
}
