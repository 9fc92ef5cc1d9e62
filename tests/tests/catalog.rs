//! The classification of every function PostgreSQL ships (`node/src/sql/functions.tsv`, read
//! by the gate) is complete and current: generated here from a live PostgreSQL's `pg_proc`
//! with every extension raftpg allows installed, and compared with the committed file.
//!
//! A PostgreSQL version (or extension version) that adds a function makes this test fail until
//! the file is regenerated — `RAFTPG_REGENERATE=1 cargo test -p raftpg-tests --test catalog` —
//! and the new entries reviewed (`sql::catalog::classify`: a new non-immutable function
//! nobody recognised is `unreviewed`, refused in writes).

use raftpg_node::sql::catalog::{self, Classified, FunctionEntry};
use testkit::StandalonePostgres;

/// Every function of `pg_catalog`, `information_schema` and the allowed extensions.
const FUNCTIONS_SQL: &str = "
SELECT CASE WHEN e.extname IS NOT NULL THEN 'ext:' || e.extname ELSE n.nspname END AS owner,
       p.proname::text,
       oidvectortypes(p.proargtypes) AS args,
       format_type(p.prorettype, NULL) AS returns,
       p.pronargs::int AS nargs,
       p.pronargdefaults::int AS ndefaults,
       p.provariadic <> 0 AS variadic,
       p.provolatile::text AS volatility
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
  LEFT JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  LEFT JOIN pg_extension e ON e.oid = d.refobjid
 WHERE n.nspname IN ('pg_catalog', 'information_schema') OR e.extname IS NOT NULL";

/// The classification of the functions of the PostgreSQL at `url` (extensions installed).
pub async fn classify_live(url: &str) -> anyhow::Result<Vec<Classified>> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    for ext in catalog::EXTENSIONS_ALLOWED {
        client
            .batch_execute(&format!("CREATE EXTENSION IF NOT EXISTS \"{ext}\""))
            .await?;
    }
    let mut out: Vec<Classified> = client
        .query(FUNCTIONS_SQL, &[])
        .await?
        .iter()
        .map(|r| {
            let args: String = r.get("args");
            let nargs = r.get::<_, i32>("nargs") as usize;
            let min = nargs - r.get::<_, i32>("ndefaults") as usize;
            let variadic: bool = r.get("variadic");
            let f = FunctionEntry {
                owner: r.get("owner"),
                name: r.get("proname"),
                args: if args.is_empty() {
                    Vec::new()
                } else {
                    args.split(", ").map(str::to_string).collect()
                },
                returns: r.get("returns"),
                min_args: if variadic { min.saturating_sub(1) } else { min },
                max_args: (!variadic).then_some(nargs),
                volatility: r
                    .get::<_, String>("volatility")
                    .chars()
                    .next()
                    .unwrap_or('v'),
            };
            Classified::from(&f)
        })
        .collect();
    out.sort_by(|a, b| {
        (a.verdict, &a.owner, &a.signature).cmp(&(b.verdict, &b.owner, &b.signature))
    });
    Ok(out)
}

fn file_text(entries: &[Classified]) -> String {
    let mut text = String::from(catalog::FUNCTIONS_TSV_HEADER);
    text.push('\n');
    for e in entries {
        text.push_str(&e.line());
        text.push('\n');
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_is_classified_and_the_file_is_current() {
    let dir = std::env::temp_dir().join("raftpg-tests/catalog_pg");
    let pg = StandalonePostgres::start(&dir, &["--encoding=UTF8", "--locale=C.UTF-8"]).unwrap();
    let live = classify_live(&pg.url()).await.unwrap();
    let generated = file_text(&live);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/src/sql/functions.tsv");
    if std::env::var_os("RAFTPG_REGENERATE").is_some() {
        std::fs::write(&path, &generated).unwrap();
        eprintln!("wrote {} ({} functions)", path.display(), live.len());
        return;
    }
    let committed = catalog::FUNCTIONS_TSV;
    let committed_lines: std::collections::BTreeSet<&str> = committed.lines().collect();
    let live_lines: std::collections::BTreeSet<&str> = generated.lines().collect();
    let missing: Vec<&&str> = live_lines.difference(&committed_lines).collect();
    let gone: Vec<&&str> = committed_lines.difference(&live_lines).collect();
    assert!(
        missing.is_empty() && gone.is_empty(),
        "node/src/sql/functions.tsv is not this PostgreSQL's catalog; {} functions are new or \
         classified differently, {} are gone. Review sql::catalog::classify, then regenerate with \
         RAFTPG_REGENERATE=1 cargo test -p raftpg-tests --test catalog.\nnew/changed: {:#?}\ngone: {:#?}",
        missing.len(),
        gone.len(),
        &missing[..missing.len().min(40)],
        &gone[..gone.len().min(40)]
    );
    // Nothing PostgreSQL ships is left unreviewed.
    let unreviewed: Vec<&Classified> = live
        .iter()
        .filter(|c| c.verdict == catalog::Verdict::Unreviewed)
        .collect();
    assert!(
        unreviewed.is_empty(),
        "functions nobody classified (refused in writes until reviewed): {:#?}",
        unreviewed.iter().map(|c| c.line()).collect::<Vec<_>>()
    );
}
