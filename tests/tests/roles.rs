//! Roles are replicated writes (issue 16): `CREATE ROLE … PASSWORD …` enters the log with the
//! password already turned into its SCRAM-SHA-256 verifier, every node stores the same
//! `pg_authid` rows and memberships, and a node that catches up from a snapshot gets them too
//! (PostgreSQL keeps roles outside the database pg_dump copies), including the owners and
//! grants of the restored tables; a role dropped after the snapshot disappears on it as well.

use std::time::Duration;

use testkit::start_cluster_with;

const COMPACT: &[&str] = &[
    "--snapshot-every-entries",
    "50",
    "--snapshot-keep-entries",
    "5",
];

/// Runs each statement as its own write (as the first administrator), panicking on a failure.
async fn run_all(c: &raftpg_client::Client, sqls: &[&str]) {
    for sql in sqls {
        c.execute_one(sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// The user roles of node `id` as its PostgreSQL holds them: name, login, verifier, and the
/// memberships, in one text.
async fn roles_of(tc: &testkit::TestCluster, id: u64) -> String {
    let pg = tc.pg(id).await.unwrap();
    let rows = pg
        .query(
            "SELECT a.rolname || ' login=' || a.rolcanlogin || ' createrole=' || a.rolcreaterole
                    || ' pw=' || coalesce(a.rolpassword, '-')
                    || ' in=' || coalesce((SELECT string_agg(g.rolname, ',' ORDER BY g.rolname)
                                           FROM pg_auth_members m JOIN pg_authid g ON g.oid = m.roleid
                                           WHERE m.member = a.oid), '')
             FROM pg_authid a
             WHERE a.rolname NOT LIKE 'pg\\_%' AND a.rolname NOT IN ('raftpg', 'raftpg_reader', 'raftpg_admin')
             ORDER BY a.rolname",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_are_replicated_and_travel_with_snapshots() {
    let mut tc = start_cluster_with("roles", 114, 3, COMPACT).await.unwrap();
    let c = &tc.client;
    run_all(
        c,
        &[
            "CREATE ROLE bob LOGIN PASSWORD 'correct horse battery staple'",
            "CREATE ROLE carol NOLOGIN",
            "CREATE ROLE dave LOGIN CREATEROLE PASSWORD 'dave-pw'",
            "GRANT carol TO bob",
            "GRANT raftpg_admin TO dave",
            "CREATE TABLE owned (id int PRIMARY KEY)",
            // Writes run as their role (here the first administrator): handing a table to bob
            // takes being able to act as bob.
            "GRANT bob TO admin",
            "GRANT CREATE ON SCHEMA public TO bob",
            "ALTER TABLE owned OWNER TO bob",
            "CREATE TABLE shared (id int PRIMARY KEY)",
            "GRANT SELECT ON shared TO carol",
        ],
    )
    .await;
    // Refused: superusers, raftpg's roles, predefined roles, MD5 hashes.
    for sql in [
        "CREATE ROLE eve SUPERUSER LOGIN PASSWORD 'x'",
        "ALTER ROLE raftpg_reader PASSWORD 'x'",
        "GRANT pg_read_server_files TO bob",
        "CREATE ROLE eve PASSWORD 'md5c2a9c5ab6fb3ebd5c6e5a0f1a9b0a6e1'",
    ] {
        assert!(c.execute_one(sql, vec![]).await.is_err(), "{sql}");
    }
    // Every node applied the same index first (node 1 may be a follower that lags).
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let on_1 = roles_of(&tc, 1).await;
    assert!(on_1.contains("bob login=true"), "{on_1}");
    assert!(on_1.contains("pw=SCRAM-SHA-256$4096:"), "{on_1}");
    assert!(!on_1.contains("correct horse"), "{on_1}");
    assert!(on_1.contains("dave login=true createrole=true"), "{on_1}");
    assert!(on_1.contains("in=carol"), "{on_1}");
    assert!(on_1.contains("in=raftpg_admin"), "{on_1}");
    for id in [2, 3] {
        assert_eq!(roles_of(&tc, id).await, on_1, "node {id}");
    }

    // Node 3 misses the roles' later changes and enough entries to need a snapshot.
    tc.cluster.kill_node(3);
    run_all(
        c,
        &[
            "DROP ROLE dave",
            "CREATE ROLE frank LOGIN PASSWORD 'frank-pw'",
            "REVOKE carol FROM bob",
            "CREATE TABLE filler (id int PRIMARY KEY)",
        ],
    )
    .await;
    for i in 0..150 {
        c.execute_one(&format!("INSERT INTO filler VALUES ({i})"), vec![])
            .await
            .unwrap();
    }
    tc.assert_identical(&[1, 2]).await.unwrap();
    let expected = roles_of(&tc, 1).await;
    assert!(!expected.contains("dave"), "{expected}");
    assert!(expected.contains("frank login=true"), "{expected}");
    tc.cluster.start_node(3).unwrap();
    // And a new node 4 starts from a snapshot alone.
    tc.cluster.start_joining_node(4, &tc.addr_of(4)).unwrap();
    c.add_learner(4, &tc.peer_addr_of(4), true).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (r3, r4) = (roles_of(&tc, 3).await, roles_of(&tc, 4).await);
        if r3 == expected && r4 == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 3:\n{r3}\nnode 4:\n{r4}\nexpected:\n{expected}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The restored tables keep their owner and grants (once the data is there: the roles come
    // first).
    tc.assert_identical(&[1, 2, 3, 4]).await.unwrap();
    for id in [3, 4] {
        let pg = tc.pg(id).await.unwrap();
        let owner: String = pg
            .query_one(
                "SELECT tableowner::text FROM pg_tables WHERE tablename = 'owned'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(owner, "bob", "node {id}");
        let granted: bool = pg
            .query_one(
                "SELECT has_table_privilege('carol', 'shared', 'SELECT')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(granted, "node {id}");
        // A role the snapshot brought can read on the node (reads switch to the role from
        // raftpg_reader, which every role is granted to, also roles created by an install).
        let read = node_client_as(&tc, id, "frank", "frank-pw", 3)
            .query_sql(
                "SELECT current_user::text",
                vec![],
                raftpg_client::v1::Consistency::Local,
            )
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e}"));
        assert_eq!(read.rows.len(), 1, "node {id}");
    }
    tc.assert_identical(&[1, 2, 3, 4]).await.unwrap();
    // raftpg check agrees, roles and privileges included (nodes 3 and 4 restored a snapshot
    // with owners and grants).
    let check = c.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
    assert_eq!(check.nodes.len(), 4, "{check:?}");
}

/// A client authenticating as `user` with `password` to every node of `tc`.
fn client_as(tc: &testkit::TestCluster, user: &str, password: &str) -> raftpg_client::Client {
    client_of(tc, &tc.cluster.addrs(), user, password, 3)
}

/// A client authenticating as `user` with `password` to node `id` only, with at most
/// `attempts` attempts per call.
fn node_client_as(
    tc: &testkit::TestCluster,
    id: u64,
    user: &str,
    password: &str,
    attempts: u32,
) -> raftpg_client::Client {
    client_of(tc, &[tc.addr_of(id)], user, password, attempts)
}

fn client_of(
    tc: &testkit::TestCluster,
    addrs: &[String],
    user: &str,
    password: &str,
    attempts_max: u32,
) -> raftpg_client::Client {
    let config = raftpg_client::ClientConfig {
        credentials: Some(raftpg_client::Credentials {
            user: user.into(),
            password: password.into(),
        }),
        attempts_max,
        ..tc.client_config()
    };
    raftpg_client::Client::with_config(addrs, config).unwrap()
}

/// Credentials are checked against the replicated roles on whichever node a request reaches:
/// a wrong password is 28P01, an unknown role or one that may not log in 28000 (gRPC
/// UNAUTHENTICATED); a password change takes effect on every node within the cache's 2 s; a
/// role that is not a member of raftpg_admin cannot change the membership, run a check or ask
/// for another node's status (42501), and one that is can, also through a follower; names and
/// passwords need not be ASCII.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_are_checked_and_only_administrators_run_the_cluster() {
    let tc = start_cluster_with("auth", 115, 3, &[]).await.unwrap();
    let c = &tc.client;
    run_all(
        c,
        &[
            "CREATE ROLE bob LOGIN PASSWORD 'bob-pw'",
            "CREATE ROLE carol NOLOGIN PASSWORD 'carol-pw'",
            "CREATE ROLE dave LOGIN PASSWORD 'dave-pw'",
            "GRANT raftpg_admin TO dave",
            "CREATE TABLE t (id int PRIMARY KEY)",
            "GRANT SELECT, INSERT ON t TO bob",
        ],
    )
    .await;
    let refused = |e: raftpg_client::ClientError, state: &str, who: &str| {
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{who}: {e}");
        assert_eq!(e.sqlstate().as_deref(), Some(state), "{who}: {e}");
    };
    for (user, password, state) in [
        ("bob", "wrong", "28P01"),
        ("nobody", "bob-pw", "28000"),
        ("carol", "carol-pw", "28000"),
    ] {
        let e = client_as(&tc, user, password)
            .execute_one("INSERT INTO t VALUES (1)", vec![])
            .await
            .unwrap_err();
        refused(e, state, user);
        let e = client_as(&tc, user, password)
            .query_sql("SELECT 1", vec![], raftpg_client::v1::Consistency::Local)
            .await
            .unwrap_err();
        refused(e, state, user);
    }
    // Nothing was written by the refused requests, on any node.
    assert_eq!(counts(&tc, "t").await, vec![0, 0, 0]);

    // The right password works on every node, also through a follower (the follower forwards
    // the write with the role it authenticated).
    let (_, follower) = tc.leader_and_follower().await;
    let bob = client_as(&tc, "bob", "bob-pw");
    for id in 1..=3u64 {
        let one = node_client_as(&tc, id, "bob", "bob-pw", 20);
        one.execute_one(&format!("INSERT INTO t VALUES ({id})"), vec![])
            .await
            .unwrap_or_else(|e| panic!("bob through node {id} (follower {follower}): {e}"));
    }
    // Not an administrator: no membership change, check or other node's status.
    let e = bob.promote(&[1]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert_eq!(e.sqlstate().as_deref(), Some("42501"), "{e}");
    let e = bob.check(Duration::from_secs(30)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = bob.member_status(0, 2).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // An administrator can, through any node.
    let dave = client_as(&tc, "dave", "dave-pw");
    assert_eq!(dave.promote(&[1]).await.unwrap().log_index, 0);
    assert!(dave.check(Duration::from_secs(30)).await.unwrap().identical);
    dave.member_status(0, 2).await.unwrap();

    // A new password: the old one stops working on every node within the cache's lifetime.
    c.execute_one("ALTER ROLE bob PASSWORD 'bob-new'", vec![])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in 1..=3u64 {
        let e = node_client_as(&tc, id, "bob", "bob-pw", 1)
            .query_sql("SELECT 1", vec![], raftpg_client::v1::Consistency::Local)
            .await
            .unwrap_err();
        refused(e, "28P01", "bob's old password");
    }
    client_as(&tc, "bob", "bob-new")
        .execute_one("INSERT INTO t VALUES (10)", vec![])
        .await
        .unwrap();

    // A name and a password beyond printable ASCII (they travel as binary metadata), through
    // every node: a follower forwards the role it authenticated in the same way, so each
    // write runs as that role.
    run_all(
        c,
        &[
            "CREATE ROLE \"jösé\" LOGIN PASSWORD ' pässwörd €'",
            "CREATE TABLE u (id int PRIMARY KEY, by text NOT NULL DEFAULT current_user)",
            "GRANT INSERT ON u TO \"jösé\"",
        ],
    )
    .await;
    for id in 1..=3u64 {
        node_client_as(&tc, id, "jösé", " pässwörd €", 20)
            .execute_one(&format!("INSERT INTO u (id) VALUES ({id})"), vec![])
            .await
            .unwrap_or_else(|e| panic!("jösé through node {id}: {e}"));
        let e = node_client_as(&tc, id, "jösé", " pässwörd", 1)
            .query_sql("SELECT 1", vec![], raftpg_client::v1::Consistency::Local)
            .await
            .unwrap_err();
        refused(e, "28P01", "jösé's wrong password");
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let by: Vec<String> = tc.column(1, "SELECT DISTINCT by FROM u").await.unwrap();
    assert_eq!(by, vec!["jösé".to_string()]);
}

/// The count of rows of `table` on every node, read directly from each PostgreSQL once every
/// node applied the same index (followers learn a commit after the leader answered it).
async fn counts(tc: &testkit::TestCluster, table: &str) -> Vec<i64> {
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let mut out = Vec::new();
    for id in 1..=3 {
        let pg = tc.pg(id).await.unwrap();
        out.push(
            pg.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    out
}

/// Writes and reads run as their role, so PostgreSQL's own privileges, ownership and
/// row-level security decide, identically on every node: a role without INSERT gets 42501 and
/// nothing is written anywhere; a policy shows each role its own rows through every node and
/// refuses rows it does not let in; `current_user` in a default is the writing role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn privileges_and_row_level_security_decide_on_every_node() {
    let tc = start_cluster_with("privileges", 116, 3, &[]).await.unwrap();
    let c = &tc.client;
    run_all(
        c,
        &[
            "CREATE ROLE bob LOGIN PASSWORD 'bob-pw'",
            "CREATE ROLE mallory LOGIN PASSWORD 'mallory-pw'",
            "CREATE TABLE t (id int PRIMARY KEY)",
            "GRANT SELECT, INSERT ON t TO bob",
            "CREATE TABLE notes (id serial PRIMARY KEY, owner text NOT NULL DEFAULT current_user, body text)",
            "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY own ON notes USING (owner = current_user) WITH CHECK (owner = current_user)",
            "GRANT SELECT, INSERT ON notes TO bob, mallory",
            "GRANT USAGE ON SEQUENCE notes_id_seq TO bob, mallory",
        ],
    )
    .await;
    let bob = client_as(&tc, "bob", "bob-pw");
    let mallory = client_as(&tc, "mallory", "mallory-pw");
    bob.execute_one("INSERT INTO t VALUES (1)", vec![])
        .await
        .unwrap();
    // No INSERT on t: refused with PostgreSQL's own error, on the node that applies it and on
    // every other; nothing is written.
    let e = mallory
        .execute_one("INSERT INTO t VALUES (2)", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42501"), "{e}");
    let e = mallory
        .query_sql(
            "SELECT * FROM t",
            vec![],
            raftpg_client::v1::Consistency::Linearizable,
        )
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42501"), "{e}");
    assert_eq!(counts(&tc, "t").await, vec![1, 1, 1]);

    // Row-level security.
    bob.execute_one("INSERT INTO notes (body) VALUES ('bob''s')", vec![])
        .await
        .unwrap();
    mallory
        .execute_one("INSERT INTO notes (body) VALUES ('mallory''s')", vec![])
        .await
        .unwrap();
    let e = mallory
        .execute_one(
            "INSERT INTO notes (owner, body) VALUES ('bob', 'forged')",
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("42501"), "{e}");
    // Each role sees its own rows only, through every node.
    for id in 1..=3u64 {
        for (who, password) in [("bob", "bob-pw"), ("mallory", "mallory-pw")] {
            let r = node_client_as(&tc, id, who, password, 20)
                .query_sql(
                    "SELECT owner FROM notes",
                    vec![],
                    raftpg_client::v1::Consistency::Linearizable,
                )
                .await
                .unwrap();
            let owners: Vec<String> = r
                .rows
                .iter()
                .map(|row| format!("{:?}", row.values[0].kind))
                .collect();
            assert_eq!(
                owners,
                vec![format!("Some(Text({who:?}))")],
                "{who} on node {id}"
            );
        }
    }
    assert_eq!(counts(&tc, "notes").await, vec![2, 2, 2]);
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}

/// The values of a read's rows as text, or its SQLSTATE.
async fn read_as(client: &raftpg_client::Client, sql: &str) -> Result<Vec<String>, String> {
    client
        .query_sql(sql, vec![], raftpg_client::v1::Consistency::Local)
        .await
        .map(|r| {
            r.rows
                .iter()
                .map(|row| {
                    row.values
                        .iter()
                        .map(|v| format!("{:?}", v.kind))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect()
        })
        .map_err(|e| e.sqlstate().unwrap_or_else(|| e.to_string()))
}

/// Reads are prepared once per read connection and then run without a `Parse` round trip
/// (`BEGIN`, the snapshot's applied index, the query and `COMMIT` in one); whatever PostgreSQL
/// decides when a statement runs still follows every change: a column added, a table replaced
/// by one of other types, a privilege revoked and granted again, a row-level policy, and the
/// search path of each session (wire protocol).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_reads_follow_schema_privilege_policy_and_search_path_changes() {
    let tc = start_cluster_with("prepared_reads", 131, 1, &[])
        .await
        .unwrap();
    let c = &tc.client;
    run_all(
        c,
        &[
            "CREATE TABLE t (id int PRIMARY KEY, owner text)",
            "INSERT INTO t VALUES (1, 'ann'), (2, 'bob')",
            "CREATE ROLE ann LOGIN PASSWORD 'ann-pw'",
            "GRANT SELECT ON t TO ann",
        ],
    )
    .await;
    let ann = node_client_as(&tc, 1, "ann", "ann-pw", 1);
    let sql = "SELECT * FROM t ORDER BY id";
    // Each expectation is read several times: the first prepares, the others run prepared.
    let expect = |want: Result<Vec<&'static str>, &'static str>| {
        let want: Result<Vec<String>, String> = want
            .map(|v| v.into_iter().map(String::from).collect())
            .map_err(String::from);
        want
    };
    for _ in 0..5 {
        assert_eq!(
            read_as(&ann, sql).await,
            expect(Ok(vec![
                "Some(Int64(1)),Some(Text(\"ann\"))",
                "Some(Int64(2)),Some(Text(\"bob\"))"
            ]))
        );
    }
    run_all(c, &["ALTER TABLE t ADD COLUMN score int DEFAULT 7"]).await;
    for _ in 0..3 {
        assert_eq!(
            read_as(&ann, sql).await,
            expect(Ok(vec![
                "Some(Int64(1)),Some(Text(\"ann\")),Some(Int64(7))",
                "Some(Int64(2)),Some(Text(\"bob\")),Some(Int64(7))"
            ]))
        );
    }
    run_all(
        c,
        &[
            "DROP TABLE t",
            "CREATE TABLE t (id text PRIMARY KEY, owner text)",
            "INSERT INTO t VALUES ('x', 'ann'), ('y', 'bob')",
            "GRANT SELECT ON t TO ann",
        ],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            read_as(&ann, sql).await,
            expect(Ok(vec![
                "Some(Text(\"x\")),Some(Text(\"ann\"))",
                "Some(Text(\"y\")),Some(Text(\"bob\"))"
            ]))
        );
    }
    run_all(c, &["REVOKE SELECT ON t FROM ann"]).await;
    for _ in 0..3 {
        assert_eq!(read_as(&ann, sql).await, expect(Err("42501")));
    }
    run_all(
        c,
        &[
            "GRANT SELECT ON t TO ann",
            "ALTER TABLE t ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY own ON t USING (owner = current_user)",
        ],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            read_as(&ann, sql).await,
            expect(Ok(vec!["Some(Text(\"x\")),Some(Text(\"ann\"))"]))
        );
        // The table's owner is not subject to its policies.
        assert_eq!(read_as(c, sql).await.map(|r| r.len()), Ok(2));
    }
    // A column raftpg returns as text (an interval) runs through a wrapping statement that
    // PostgreSQL would keep running unchanged after a column is added (its result type does not
    // change): prepared statements are dropped whenever the applier commits DDL.
    run_all(
        c,
        &[
            "CREATE TABLE m (id int PRIMARY KEY, span interval)",
            "INSERT INTO m VALUES (1, '1 day')",
        ],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            read_as(c, "SELECT * FROM m").await,
            expect(Ok(vec![
                "Some(Int64(1)),Some(PgText(PgText { type_oid: 1186, text: \"1 day\" }))"
            ]))
        );
    }
    run_all(c, &["ALTER TABLE m ADD COLUMN z int DEFAULT 5"]).await;
    for _ in 0..3 {
        assert_eq!(
            read_as(c, "SELECT * FROM m").await,
            expect(Ok(vec![
                "Some(Int64(1)),Some(PgText(PgText { type_oid: 1186, text: \"1 day\" })),Some(Int64(5))"
            ]))
        );
    }
    // The search path: the same text names another table in each session.
    run_all(
        c,
        &[
            "CREATE SCHEMA s1",
            "CREATE SCHEMA s2",
            "CREATE TABLE s1.u (v text)",
            "CREATE TABLE s2.u (v int)",
            "INSERT INTO s1.u VALUES ('one')",
            "INSERT INTO s2.u VALUES (2)",
        ],
    )
    .await;
    let w1 = tc.wire(1).await.unwrap();
    let w2 = tc.wire(1).await.unwrap();
    w1.batch_execute("SET search_path = s1").await.unwrap();
    w2.batch_execute("SET search_path = s2").await.unwrap();
    for _ in 0..3 {
        let one: String = w1.query_one("SELECT v FROM u", &[]).await.unwrap().get(0);
        assert_eq!(one, "one");
        let two: i32 = w2.query_one("SELECT v FROM u", &[]).await.unwrap().get(0);
        assert_eq!(two, 2);
    }
}

/// A client that reaches a new cluster before its first administrator exists (the log creates
/// it a moment after the first election) is told to retry — UNAVAILABLE on gRPC, which the
/// client retries, `57P03` on the wire protocol — never that the role does not exist or that
/// its password is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_cluster_asks_for_a_retry_until_its_first_administrator_exists() {
    let tc = testkit::launch_cluster("first_admin", 150, 3)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    // gRPC from the first moment: the client retries what it is told to retry.
    let grpc = async {
        tc.client
            .execute_one("CREATE TABLE made_at_once (id int PRIMARY KEY)", vec![])
            .await
    };
    // The wire protocol, connecting to node 2 until it lets the administrator in.
    let wire = async {
        let mut asked_to_retry = 0;
        loop {
            match tc.wire(2).await {
                Ok(w) => {
                    w.simple_query("SELECT 1").await.unwrap();
                    return asked_to_retry;
                }
                Err(e) => {
                    let code = e
                        .chain()
                        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
                        .and_then(|e| e.code())
                        .map(|c| c.code().to_string());
                    match code.as_deref() {
                        Some("57P03") => asked_to_retry += 1,
                        // Not listening yet.
                        None => {}
                        Some(other) => panic!("the wire protocol answered {other}: {e:#}"),
                    }
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node 2 never let the administrator in"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (written, asked_to_retry) = tokio::join!(grpc, wire);
    written.expect("a write sent before the first administrator existed");
    assert!(
        asked_to_retry > 0,
        "the wire protocol never met the cluster before its first administrator existed"
    );
}
