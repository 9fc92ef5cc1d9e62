//! What PostgreSQL infers for a statement without running it (the wire protocol's `Describe`):
//! preparing with the client's parameter types, and the result columns with this node's type
//! OIDs. Used on read connections and on the applier session (inside a transaction).

use tokio_postgres::types::{Kind, Type};
use tokio_postgres::GenericClient;

use crate::command::ColumnInfo;

/// The result columns of a prepared statement, with this node's type OIDs.
pub fn columns_of(stmt: &tokio_postgres::Statement) -> Vec<ColumnInfo> {
    stmt.columns()
        .iter()
        .map(|c| ColumnInfo {
            name: c.name().to_string(),
            type_name: c.type_().name().to_string(),
            type_oid: c.type_().oid(),
        })
        .collect()
}

/// Prepares `sql` with the parameter types the client gave (0: PostgreSQL infers the type).
pub async fn prepare<C: GenericClient>(
    client: &C,
    sql: &str,
    param_types: &[u32],
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    if param_types.iter().all(|t| *t == 0) {
        return client.prepare(sql).await;
    }
    let types: Vec<Type> = param_types.iter().map(|oid| type_of_oid(*oid)).collect();
    client.prepare_typed(sql, &types).await
}

/// A type by OID for a `Parse` message (only the OID is sent; PostgreSQL knows the rest).
fn type_of_oid(oid: u32) -> Type {
    Type::from_oid(oid)
        .unwrap_or_else(|| Type::new(format!("oid {oid}"), oid, Kind::Simple, String::new()))
}
