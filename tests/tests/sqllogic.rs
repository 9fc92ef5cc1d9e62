//! sqllogictest files (`tests/slt/*.slt`) run through raftpg's wire protocol — on a follower
//! and on the leader, with the simple and the extended query protocol — and against a plain
//! PostgreSQL with the same files and the same expected output. The client is tokio-postgres:
//! its simple queries give PostgreSQL's text; its extended queries give the binary form,
//! printed here by one formatter for both servers.

use std::path::PathBuf;

use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use testkit::{start_cluster_insecure, StandalonePostgres};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::SimpleQueryMessage;

/// An error as PostgreSQL reported it (SQLSTATE and message), for `statement error` lines.
#[derive(Debug)]
struct PgError(String);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => PgError(format!("{}: {}", db.code().code(), db.message())),
            None => PgError(e.to_string()),
        }
    }
}

/// A tokio-postgres connection speaking one of the two query protocols.
struct Pg {
    client: tokio_postgres::Client,
    extended: bool,
}

#[async_trait]
impl sqllogictest::AsyncDB for Pg {
    type Error = PgError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, Self::Error> {
        match self.extended {
            false => simple(&self.client, sql).await,
            true => extended(&self.client, sql).await,
        }
        .map_err(PgError::from)
    }

    async fn shutdown(&mut self) {}

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn cell(v: Option<&str>) -> String {
    match v {
        None => "NULL".into(),
        Some("") => "(empty)".into(),
        Some(s) => s.to_string(),
    }
}

async fn simple(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<DBOutput<DefaultColumnType>, tokio_postgres::Error> {
    let mut rows = Vec::new();
    let mut width = None;
    let mut count = 0;
    for m in c.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::Row(r) => {
                width = Some(r.len());
                rows.push((0..r.len()).map(|i| cell(r.get(i))).collect());
            }
            SimpleQueryMessage::RowDescription(cols) => width = Some(cols.len()),
            SimpleQueryMessage::CommandComplete(n) => count = n,
            _ => {}
        }
    }
    Ok(match width {
        Some(w) => DBOutput::Rows {
            types: vec![DefaultColumnType::Any; w],
            rows,
        },
        None => DBOutput::StatementComplete(count),
    })
}

/// A binary result cell as text (the types the files print in the extended protocol).
struct Text(String);

impl<'a> FromSql<'a> for Text {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use raftpg_node::pg::values::Cell;
        use raftpg_node::wire::values::{text_of, TextSettings};
        let Cell(v) = Cell::from_sql(ty, raw)?;
        let text = text_of(&v, ty.oid(), TextSettings::default())?;
        Ok(Text(String::from_utf8(text.unwrap_or_default())?))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

async fn extended(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<DBOutput<DefaultColumnType>, tokio_postgres::Error> {
    let stmt = c.prepare(sql).await?;
    if stmt.columns().is_empty() {
        return Ok(DBOutput::StatementComplete(c.execute(&stmt, &[]).await?));
    }
    let rows = c.query(&stmt, &[]).await?;
    Ok(DBOutput::Rows {
        types: vec![DefaultColumnType::Any; stmt.columns().len()],
        rows: rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| match r.get::<_, Option<Text>>(i) {
                        Some(Text(s)) => cell(Some(&s)),
                        None => cell(None),
                    })
                    .collect()
            })
            .collect(),
    })
}

fn slt_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// Runs every file on a fresh schema of the database `connect` reaches, with `extended`.
async fn run_files<F, Fut>(what: &str, connect: F, extended: bool)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = tokio_postgres::Client> + Send,
{
    for file in slt_files() {
        let admin = connect().await;
        admin
            .batch_execute("DROP TABLE IF EXISTS t, m; DROP TYPE IF EXISTS mood")
            .await
            .unwrap();
        let connect = connect.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let connect = connect.clone();
            async move {
                Ok::<_, PgError>(Pg {
                    client: connect().await,
                    extended,
                })
            }
        });
        runner.add_label(if extended { "extended" } else { "simple" });
        runner
            .run_file_async(&file)
            .await
            .unwrap_or_else(|e| panic!("{what}, {}: {e}", file.display()));
    }
}

/// The same files, the same expected output: raftpg (a follower and the leader, both
/// protocols) and a plain PostgreSQL initialised as raftpg's nodes are (UTF-8, C.UTF-8).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slt_files_agree_with_plain_postgresql() {
    let dir = std::env::temp_dir().join(format!("raftpg-slt-pg-{}", std::process::id()));
    let plain = StandalonePostgres::start(&dir, &["--encoding=UTF8", "--locale=C.UTF-8"]).unwrap();
    let url = plain.url();
    for extended in [false, true] {
        let url = url.clone();
        run_files(
            "plain PostgreSQL",
            move || {
                let url = url.clone();
                async move {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    c
                }
            },
            extended,
        )
        .await;
    }
    drop(plain);
    let _ = std::fs::remove_dir_all(&dir);

    let tc = start_cluster_insecure("sqllogic", 125, 3).await.unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    for (node, extended) in [
        (follower, false),
        (leader, true),
        (follower, true),
        (leader, false),
    ] {
        let (host, port) = tc.cluster.node(node).pg_host_port();
        run_files(
            &format!("raftpg node {node}"),
            move || {
                let host = host.clone();
                async move {
                    raftpg_client::pg_wire::connect(&host, port, "raftpg", None, None)
                        .await
                        .unwrap()
                }
            },
            extended,
        )
        .await;
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}
