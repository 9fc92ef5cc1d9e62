//! The bodies of raftpg-node's fuzz targets, one function per target, each taking the raw
//! input bytes. Included with `#[path]` by every target in this folder (`cargo +nightly fuzz
//! run <target>`) and by `node/tests/fuzz_corpus.rs`, which replays the committed corpus
//! (`node/fuzz/corpus/<target>/`) on stable in `cargo test`. A panic here is a finding: either
//! the node's code panics on bad input, or one of the properties asserted below does not hold.
//! See docs/security.md, "Fuzzing".
#![allow(dead_code)] // each target uses one of the functions

use bytes::BytesMut;
use openraft::error::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use postgres_types::{FromSql, IsNull, Kind, ToSql, Type};
use prost::Message;
use raftpg_node::command::{ApplyOutcome, Command, Entry, SqlValue, TypeConfig};
use raftpg_node::grpc::convert;
use raftpg_node::pg::values::{self, Cell};
use raftpg_node::raft::append_check::check_append_entries;
use raftpg_node::raft::network::{RemoteSnapshotError, SnapshotChunk};
use raftpg_node::service::Origin;
use raftpg_node::sql::{gate, session_rules, time_literals};
use raftpg_node::wire::{connection, copy, settings, statement, stream, values as wire_values};
use raftpg_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Reads the fuzzer's bytes as typed fields; past the end every read gives zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn rest_str(&mut self) -> String {
        String::from_utf8_lossy(self.rest()).into_owned()
    }
}

// ------------------------------------------------------------------ sql_gate

/// The SQL gate and rewrite (`sql::gate`, `sql::time_literals`, `sql::session_rules`) on
/// arbitrary UTF-8: the leader runs them on every client's SQL before anything enters the log.
/// Properties: a refusal carries a 5-character SQLSTATE and a message; a rewritten write is
/// still one statement that PostgreSQL's grammar parses.
pub fn sql_gate(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    match gate::prepare_write(sql) {
        Ok(prepared) => {
            if prepared != sql {
                let parsed = pg_query::parse(&prepared, 0).unwrap_or_else(|e| {
                    panic!("the rewrite of {sql:?} does not parse: {prepared:?}: {e}")
                });
                assert_eq!(parsed.protobuf.stmts.len(), 1, "rewrite {prepared:?}");
            }
            // What the leader (extension check) and the applier (SET LOCAL undo) then ask of
            // an accepted write.
            let _ = gate::extension_required(&prepared);
            let _ = gate::settings_set_by(&prepared);
        }
        Err(r) => check_refusal(&r),
    }
    if let Err(r) = gate::check_read(sql) {
        check_refusal(&r);
    }
    // The string-literal rules, on the text as one literal / one setting name.
    let _ = time_literals::exact_word(sql);
    if time_literals::is_time_string(sql) {
        let _ = time_literals::refusal_message(sql);
    }
    for ty in ["timestamptz", "timestamp", "date", "time", "text"] {
        let _ = time_literals::rewrite(sql, ty, false);
    }
    let _ = session_rules::set_local_refusal(sql);
}

fn check_refusal(r: &gate::Refusal) {
    assert_eq!(r.sqlstate.len(), 5, "sqlstate of {r:?}");
    assert!(!r.message.is_empty(), "refusal without a message");
}

// ------------------------------------------------------------------ proto_decode

/// The protobuf decode of every message a node receives on its gRPC ports, chosen by the first
/// byte, then the node's conversion of what decoded (`grpc::convert`). Properties: encoding
/// what decoded and decoding it again gives the same bytes; a write's forward encoding
/// (`convert::execute_request`) decodes.
pub fn proto_decode(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let len = body.len();
    let flag = selector & 0x80 != 0;
    match selector & 0x7f {
        // Write service.
        0 => {
            if let Some(req) = decode::<pb::ExecuteRequest>(body) {
                let origin = if flag {
                    Origin::Forwarded
                } else {
                    Origin::Client
                };
                let w = convert::write_request(req, len, origin);
                let fwd = convert::execute_request(&w);
                pb::ExecuteRequest::decode(fwd.encode_to_vec().as_slice())
                    .expect("a forwarded write decodes");
            }
        }
        // Read service (unary and streamed).
        1 => {
            if let Some(req) = decode::<pb::QueryRequest>(body) {
                let _ = convert::read_request(req, len, flag);
            }
        }
        // Cluster and Peer services.
        2 => drop(decode::<pb::AddLearnerRequest>(body)),
        3 => drop(decode::<pb::PromoteRequest>(body)),
        4 => drop(decode::<pb::RemoveRequest>(body)),
        5 => drop(decode::<pb::TransferLeaderRequest>(body)),
        6 => drop(decode::<pb::StatusRequest>(body)),
        7 => drop(decode::<pb::CheckRequest>(body)),
        8 => drop(decode::<pb::TableChecksumsRequest>(body)),
        9 => drop(decode::<pb::RetireRequest>(body)),
        10 => drop(decode::<pb::RaftMessage>(body)),
        11 => drop(decode::<pb::ReadIndexRequest>(body)),
        // Answers of other nodes, which a node decodes and converts too (a forwarded write's
        // result, status and check of the members, membership changes, read index).
        12 => {
            if let Some(r) = decode::<pb::ExecuteResponse>(body) {
                let _ = convert::write_outcome(r);
            }
        }
        13 => {
            if let Some(r) = decode::<pb::StatusResponse>(body) {
                let _ = convert::node_status(r);
            }
        }
        14 => {
            if let Some(r) = decode::<pb::CheckResponse>(body) {
                let _ = convert::check_report(r);
            }
        }
        15 => {
            if let Some(r) = decode::<pb::MembershipResponse>(body) {
                let _ = convert::membership_outcome(r);
            }
        }
        16 => {
            if let Some(r) = decode::<pb::TableChecksumsResponse>(body) {
                let _: Vec<_> = r
                    .tables
                    .into_iter()
                    .map(convert::table_checksum_from)
                    .collect();
            }
        }
        17 => drop(decode::<pb::ReadIndexResponse>(body)),
        18 => drop(decode::<pb::QueryResponse>(body)),
        19 => drop(decode::<pb::QueryChunk>(body)),
        20 => drop(decode::<pb::PublishAddressRequest>(body)),
        21 => drop(decode::<pb::PublishAddressResponse>(body)),
        _ => {}
    }
}

/// Decodes a message; if it decodes, checks that it re-encodes stably.
fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    let m = M::decode(body).ok()?;
    let once = m.encode_to_vec();
    let again = M::decode(once.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again.encode_to_vec(), once, "re-encoding is not stable");
    Some(m)
}

// ------------------------------------------------------------------ raft_decode

/// The JSON decode of the Raft messages a node receives (`grpc::peer`: AppendEntries (and its
/// `raft::append_check`), Vote,
/// InstallSnapshot), of the answers it receives (`raft::network`), of a log entry and of the
/// entry's data (`command::Command`) and of a recorded outcome, chosen by the first byte.
/// Property: serializing what decoded, decoding and serializing again gives the same JSON.
pub fn raft_decode(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 10 {
        0 => {
            // What the peer service does with an AppendEntries before openraft sees it.
            json::<AppendEntriesRequest<TypeConfig>>(body);
            if let Ok(rpc) = serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(body) {
                let _ = check_append_entries(&rpc);
            }
        }
        1 => json::<VoteRequest<TypeConfig>>(body),
        2 => json::<SnapshotChunk>(body),
        3 => json::<Command>(body),
        4 => json::<Entry>(body),
        5 => json::<Result<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>>>(body),
        6 => json::<Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>>>(body),
        7 => json::<Result<SnapshotResponse<TypeConfig>, RemoteSnapshotError>>(body),
        8 => json::<ApplyOutcome>(body),
        _ => json::<SqlValue>(body),
    }
}

fn json<T: Serialize + DeserializeOwned>(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(body) else {
        return;
    };
    let once = serde_json::to_vec(&v).expect("what decoded encodes");
    let back: T = serde_json::from_slice(&once).unwrap_or_else(|e| {
        panic!(
            "re-encoded JSON does not decode: {e}: {}",
            String::from_utf8_lossy(&once)
        )
    });
    let again = serde_json::to_vec(&back).expect("what decoded encodes");
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(&once),
        "JSON re-encoding is not stable"
    );
}

// ------------------------------------------------------------------ values

/// The value codecs (`pg::values`), mode chosen by the first byte:
/// - a wire value (type by the second byte, kind by the third, payload from the rest) through
///   `from_proto`/`result_from_proto`, the wire and the log's JSON, then bound to that
///   PostgreSQL type and to the value's own (`check_bind` and the `ToSql` encoding must agree;
///   what encodes decodes as a binary result, `Cell`);
/// - arbitrary bytes as a binary result of that type (`Cell`, `decode_numeric`);
/// - text through `encode_numeric`, `decode_numeric` and `encode_numeric` again (same bytes).
pub fn values(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte() % 4;
    let ty = &TYPES[usize::from(input.byte()) % TYPES.len()];
    let _ = values::check_result_type(ty);
    match mode {
        0 | 1 => {
            let v = wire_value(&mut input);
            let param = values::from_proto(&v);
            let result = values::result_from_proto(&v);
            if let Ok(p) = &param {
                let r = result
                    .as_ref()
                    .expect("a valid parameter is a valid result");
                assert!(same(p, r), "{p:?} as a result: {r:?}");
            }
            for sv in [param.ok(), result.ok()].into_iter().flatten() {
                check_value(&sv, ty);
            }
        }
        2 => {
            let raw = input.rest();
            if let Ok(Cell(sv)) = Cell::from_sql(ty, raw) {
                let _ = values::wire_size(&sv);
                let _ = values::to_proto(&sv);
            }
            let _ = values::decode_numeric(raw);
        }
        _ => {
            let text = input.rest_str();
            let mut out = BytesMut::new();
            if values::encode_numeric(&text, &mut out).is_ok() {
                let decoded = values::decode_numeric(&out).expect("an encoded numeric decodes");
                let mut again = BytesMut::new();
                values::encode_numeric(&decoded, &mut again)
                    .unwrap_or_else(|e| panic!("{text:?} decodes as {decoded:?}: {e}"));
                assert_eq!(
                    again, out,
                    "{text:?} decodes as {decoded:?}, a different number"
                );
            }
        }
    }
}

fn wire_value(input: &mut Input) -> pb::Value {
    use pb::value::Kind as K;
    let kind = match input.byte() % 14 {
        0 => None,
        1 => Some(K::Null(input.byte() & 1 == 1)),
        2 => Some(K::Bool(input.byte() & 1 == 1)),
        3 => Some(K::Int64(input.u64() as i64)),
        4 => Some(K::Float64(f64::from_bits(input.u64()))),
        5 => Some(K::Numeric(input.rest_str())),
        6 => Some(K::Text(input.rest_str())),
        7 => Some(K::Bytes(input.rest().to_vec())),
        8 => Some(K::TimestamptzMicros(input.u64() as i64)),
        9 => Some(K::TimestampMicros(input.u64() as i64)),
        10 => Some(K::DateDays(input.u64() as i32)),
        11 => Some(K::Uuid(input.rest_str())),
        12 => Some(K::Json(input.rest_str())),
        _ => Some(K::Jsonb(input.rest_str())),
    };
    pb::Value { kind }
}

/// The PostgreSQL types a parameter or result can have: every supported one, and some that
/// are not.
static TYPES: std::sync::LazyLock<Vec<Type>> = std::sync::LazyLock::new(|| {
    vec![
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::OID,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::NUMERIC,
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::UNKNOWN,
        Type::BYTEA,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMP,
        Type::DATE,
        Type::UUID,
        Type::JSON,
        Type::JSONB,
        Type::new(
            "mood".into(),
            90_001,
            Kind::Enum(vec!["happy".into()]),
            "public".into(),
        ),
        Type::new("citext".into(), 90_002, Kind::Simple, "public".into()),
        Type::INTERVAL,
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
        Type::POINT,
        Type::TIME,
        Type::XML,
    ]
});

/// Equal values (a NaN equals a NaN: the codecs must keep it, not its payload bits).
fn same(a: &SqlValue, b: &SqlValue) -> bool {
    match (a, b) {
        (SqlValue::Float64(x), SqlValue::Float64(y)) => x == y || (x.is_nan() && y.is_nan()),
        _ => a == b,
    }
}

/// The type a value comes back as, unchanged, from a binary result of that type.
fn native_type(v: &SqlValue) -> Option<Type> {
    Some(match v {
        SqlValue::Bool(_) => Type::BOOL,
        SqlValue::Int64(_) => Type::INT8,
        SqlValue::Float64(_) => Type::FLOAT8,
        SqlValue::Text(_) => Type::TEXT,
        SqlValue::Bytes(_) => Type::BYTEA,
        SqlValue::TimestamptzMicros(_) => Type::TIMESTAMPTZ,
        SqlValue::TimestampMicros(_) => Type::TIMESTAMP,
        SqlValue::DateDays(_) => Type::DATE,
        SqlValue::Uuid(_) => Type::UUID,
        SqlValue::Json(_) => Type::JSON,
        SqlValue::Jsonb(_) => Type::JSONB,
        SqlValue::Null
        | SqlValue::Numeric(_)
        | SqlValue::PgText { .. }
        | SqlValue::PgBinary { .. } => return None,
    })
}

fn check_value(sv: &SqlValue, ty: &Type) {
    let _ = values::wire_size(sv);
    let _ = values::approx_size(sv);
    let _ = values::kind_name(sv);
    // Back to the wire and again (a result relayed by a follower).
    let back = values::result_from_proto(&values::to_proto(sv)).expect("a log value converts");
    assert!(
        same(&back, sv),
        "to_proto round trip: {sv:?} came back as {back:?}"
    );
    // The log's JSON (entries, recorded outcomes): what was accepted must come back.
    // Finding F1 (docs/security.md, fixed): non-finite float8 values must survive it too.
    let logged = serde_json::to_vec(sv).expect("a value encodes");
    let back: SqlValue = serde_json::from_slice(&logged).unwrap_or_else(|e| {
        panic!(
            "{sv:?} in the log does not decode: {e}: {}",
            String::from_utf8_lossy(&logged)
        )
    });
    assert!(
        same(&back, sv),
        "log JSON round trip: {sv:?} came back as {back:?}"
    );
    check_binds(sv, ty);
}

/// Binds a value to `ty` and to its own type: `check_bind` and `ToSql` agree, and what
/// encodes decodes (unchanged, from the value's own type).
fn check_binds(sv: &SqlValue, ty: &Type) {
    let native = native_type(sv);
    for t in std::iter::once(ty).chain(native.as_ref()) {
        let check = values::check_bind(sv, t);
        let mut out = BytesMut::new();
        let encoded = sv.to_sql_checked(t, &mut out);
        assert_eq!(
            check.is_ok(),
            encoded.is_ok(),
            "check_bind and ToSql disagree on {sv:?} as {t}"
        );
        if let Ok(IsNull::No) = encoded {
            let Cell(decoded) = Cell::from_sql(t, &out)
                .unwrap_or_else(|e| panic!("{sv:?} bound as {t} does not decode: {e}"));
            if native.as_ref() == Some(t) {
                assert!(
                    same(&decoded, sv),
                    "{t} round trip: {sv:?} came back as {decoded:?}"
                );
            }
        }
    }
}

/// Target `wire_messages`: bytes a PostgreSQL client could send, through the wire frontend's
/// message decoding (`wire::stream`, pgwire's codec behind raftpg's size limit; a panic inside
/// it must be caught there, never escape) and the frontend's handling of each message that
/// needs no node: the startup's settings, a query string split and classified, a Bind's
/// parameters read in their formats, a SASL response parsed, COPY data parsed in both formats.
/// The first byte picks the state the connection starts in (startup or after it).
pub fn wire_messages(data: &[u8]) {
    use pgwire::messages::PgWireFrontendMessage as F;
    use tokio_util::codec::Decoder;
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let mut codec = stream::WireCodec::new(first & 1 == 0, 1 << 20);
    let mut buf = BytesMut::from(rest);
    let text_copy = copy::Format::text();
    let csv_copy = copy::Format {
        header: first & 2 != 0,
        escape: if first & 4 != 0 { b'\\' } else { b'"' },
        ..copy::Format::csv()
    };
    let mut text_parser = copy::Parser::new(text_copy);
    let mut csv_parser = copy::Parser::new(csv_copy);
    let panics = stream::DECODER_PANICS.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..256 {
        let before = buf.len();
        let msg = match codec.decode(&mut buf) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        assert!(buf.len() < before, "a message was decoded from no input");
        match msg {
            F::Startup(s) => {
                let mut st = settings::Settings::new("fuzz", "15.0");
                for (k, v) in connection::startup_settings(&s) {
                    let _ = st.startup(&k, &v);
                }
                let _ = st.reported();
                codec.set_state(pgwire::api::PgWireConnectionState::AuthenticationInProgress);
            }
            F::PasswordMessageFamily(p) => {
                let _ = connection::initial_response(p);
                codec.set_state(pgwire::api::PgWireConnectionState::ReadyForQuery);
            }
            F::Query(q) => wire_statements(&q.query),
            F::Parse(p) => wire_statements(&p.query),
            F::Bind(b) => {
                let formats =
                    wire_values::formats_for(&b.parameter_format_codes, b.parameters.len());
                for (i, (raw, f)) in b.parameters.iter().zip(&formats).enumerate() {
                    // The parameter's type: a built-in one picked by the input.
                    let oid = PARAM_OIDS[i % PARAM_OIDS.len()];
                    if let Ok(v) = wire_values::param_value(
                        raw.as_deref(),
                        wire_values::is_binary(*f),
                        oid,
                        i + 1,
                    ) {
                        let _ = wire_values::text_of(&v, oid, wire_values::TextSettings::default());
                        let _ = wire_values::binary_of(&v, oid);
                    }
                }
            }
            F::CopyData(d) => {
                let _ = text_parser.feed(&d.data);
                let _ = csv_parser.feed(&d.data);
            }
            F::CopyDone(_) => {
                let _ = text_parser.finish();
                let _ = csv_parser.finish();
            }
            _ => {}
        }
    }
    assert_eq!(
        stream::DECODER_PANICS.load(std::sync::atomic::Ordering::Relaxed),
        panics,
        "a message panicked pgwire's decoder"
    );
}

/// Parameter types the Bind messages of `wire_messages` are read as.
const PARAM_OIDS: [u32; 12] = [0, 16, 20, 21, 23, 25, 700, 701, 1700, 1184, 2950, 3802];

fn wire_statements(sql: &str) {
    if let Ok(stmts) = statement::split(sql) {
        for s in stmts {
            assert!(
                sql.contains(s.sql.as_str()),
                "a statement that is not in its string"
            );
            let mut st = settings::Settings::new("fuzz", "15.0");
            if let statement::Kind::Set { name, value } = &s.kind {
                let _ = st.set(name, value.as_deref());
            }
        }
    }
}
