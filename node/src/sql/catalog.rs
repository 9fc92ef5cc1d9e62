//! What a write may call: every function PostgreSQL ships (and every function of the
//! extensions raftpg allows), classified once, with the reason.
//!
//! Owns the classification rules ([`classify`]) and the committed result,
//! `node/src/sql/functions.tsv`, which the gate reads ([`lookup`], [`body_verdict`]). The file
//! is generated from a live PostgreSQL's `pg_proc` by `tests/tests/catalog.rs`, which fails when
//! the catalog holds a function the file does not (a new PostgreSQL version, a new extension
//! version) — so nothing reaches writes unclassified.
//!
//! Invariant: a write may call a built-in or extension function only if its verdict allows it
//! ([`Verdict::allowed_in_writes`]); the rules are an allowlist — a function that is not
//! immutable and that no rule recognises is [`Verdict::Unreviewed`], refused in writes.
//! Calls are resolved by name and number of arguments (the gate has no types): when several
//! overloads match, the strictest verdict wins.

use std::collections::HashMap;
use std::sync::LazyLock;

/// How a function may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Immutable: same arguments, same result, everywhere.
    Immutable,
    /// Not immutable, but the result depends only on the replicated database contents and the
    /// applier's fixed settings (time zone, date style, search path, text search config, …).
    Deterministic,
    /// Replaced at the leader by raftpg's deterministic version (`now()` → `raftpg.now()`).
    Rewritten,
    /// Sequence functions: positions are replicated with the log (see `apply::state_machine`).
    Sequence,
    /// Not meant to be called directly (type input, planner support, trigger and handler
    /// functions): refused in writes.
    Internal,
    /// Not immutable and no rule vouches for it: refused in writes until reviewed.
    Unreviewed,
    /// Reads something that differs between nodes (sizes, statistics, transaction ids, files,
    /// server settings, the connection): refused in writes, allowed in reads.
    PerNode,
    /// Leaves state behind in the session (session-level locks, the random seed, settings):
    /// refused in writes and in reads (reads share pooled connections).
    Session,
    /// Runs SQL given as text or changes the role a statement runs as: refused everywhere.
    Escape,
}

impl Verdict {
    /// All verdicts, in file order.
    pub const ALL: [Verdict; 9] = [
        Verdict::Immutable,
        Verdict::Deterministic,
        Verdict::Rewritten,
        Verdict::Sequence,
        Verdict::Internal,
        Verdict::Unreviewed,
        Verdict::PerNode,
        Verdict::Session,
        Verdict::Escape,
    ];

    /// The name used in `functions.tsv` and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Immutable => "immutable",
            Verdict::Deterministic => "deterministic",
            Verdict::Rewritten => "rewritten",
            Verdict::Sequence => "sequence",
            Verdict::Internal => "internal",
            Verdict::Unreviewed => "unreviewed",
            Verdict::PerNode => "per-node",
            Verdict::Session => "session",
            Verdict::Escape => "escape",
        }
    }

    /// The verdict named `s`.
    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether a write may call it.
    pub fn allowed_in_writes(self) -> bool {
        matches!(
            self,
            Verdict::Immutable | Verdict::Deterministic | Verdict::Rewritten | Verdict::Sequence
        )
    }

    /// Whether a read may call it.
    pub fn allowed_in_reads(self) -> bool {
        !matches!(self, Verdict::Session | Verdict::Escape)
    }
}

/// One function of `pg_proc`, as the classifier sees it.
#[derive(Debug, Clone)]
pub struct FunctionEntry {
    /// `pg_catalog`, `information_schema`, or `ext:<extension>`.
    pub owner: String,
    /// `proname`.
    pub name: String,
    /// Argument types (`oidvectortypes`), as PostgreSQL prints them.
    pub args: Vec<String>,
    /// Return type, as PostgreSQL prints it.
    pub returns: String,
    /// Arguments without defaults.
    pub min_args: usize,
    /// Most arguments (`None`: variadic).
    pub max_args: Option<usize>,
    /// `provolatile`: `i`, `s` or `v`.
    pub volatility: char,
}

impl FunctionEntry {
    /// `name(type, type)`.
    pub fn signature(&self) -> String {
        format!("{}({})", self.name, self.args.join(", "))
    }
}

/// The extensions `CREATE EXTENSION` may install: PostgreSQL's *trusted* extensions (roles
/// that are not superusers may install them; raftpg has none) whose functions are classified
/// below. The others read node-local state, run SQL given as text, reach outside the database,
/// or add features raftpg refuses anyway (`lo`, `tcn`, `tsm_system_*`).
pub const EXTENSIONS_ALLOWED: &[&str] = &[
    "btree_gin",
    "btree_gist",
    "citext",
    "cube",
    "dict_int",
    "fuzzystrmatch",
    "hstore",
    "intarray",
    "isn",
    "ltree",
    "pg_trgm",
    "pgcrypto",
    "plpgsql",
    "seg",
    "tablefunc",
    "unaccent",
    "uuid-ossp",
];

/// Types whose values cannot be written in SQL (or only as raw input text): a function taking
/// them is a type input, planner, index or handler function.
const INTERNAL_TYPES: &[&str] = &[
    "internal",
    "cstring",
    "trigger",
    "event_trigger",
    "language_handler",
    "fdw_handler",
    "index_am_handler",
    "table_am_handler",
    "tsm_handler",
];

/// Non-immutable functions whose result depends only on the replicated contents and the
/// applier's fixed settings. Reviewed one by one; the note says what they depend on.
const DETERMINISTIC: &[(&str, &str)] = &[
    // Date and time arithmetic, formatting and parsing: the applier's TimeZone, DateStyle,
    // IntervalStyle and lc_time are fixed (session_rules::FIXED_SETTINGS). Time words in
    // strings ('now', 'today') are handled by sql::time_literals.
    ("date_part", "time zone setting"),
    ("extract", "time zone setting"),
    ("date_trunc", "time zone setting"),
    ("to_char", "time zone and locale settings"),
    ("to_date", "date style setting"),
    ("to_timestamp", "time zone setting"),
    ("to_number", "locale setting"),
    ("timezone", "time zone setting"),
    ("make_timestamptz", "time zone setting"),
    ("date", "time zone setting"),
    ("time", "time zone setting"),
    ("timetz", "time zone setting"),
    ("timestamp", "time zone setting"),
    ("timestamptz", "time zone setting"),
    ("overlaps", "time zone setting"),
    ("generate_series", "time zone setting"),
    ("in_range", "time zone setting"),
    ("jsonb_path_exists_tz", "time zone setting"),
    ("jsonb_path_match_tz", "time zone setting"),
    ("jsonb_path_query_tz", "time zone setting"),
    ("jsonb_path_query_array_tz", "time zone setting"),
    ("jsonb_path_query_first_tz", "time zone setting"),
    // Output of values as text: settings fixed by the applier.
    ("format", "output settings"),
    ("concat", "output settings"),
    ("concat_ws", "output settings"),
    ("textanycat", "output settings"),
    ("anytextcat", "output settings"),
    ("quote_literal", "output settings"),
    ("quote_nullable", "output settings"),
    ("array_to_string", "output settings"),
    ("array_to_json", "output settings"),
    ("row_to_json", "output settings"),
    ("to_json", "output settings"),
    ("to_jsonb", "output settings"),
    ("json_agg", "output settings"),
    ("json_agg_transfn", "output settings"),
    ("json_object_agg", "output settings"),
    ("json_object_agg_transfn", "output settings"),
    ("json_build_array", "output settings"),
    ("json_build_object", "output settings"),
    ("jsonb_agg", "output settings"),
    ("jsonb_agg_transfn", "output settings"),
    ("jsonb_agg_finalfn", "output settings"),
    ("jsonb_object_agg_transfn", "output settings"),
    ("jsonb_object_agg_finalfn", "output settings"),
    ("jsonb_build_array", "output settings"),
    ("jsonb_build_object", "output settings"),
    ("json_populate_record", "input settings"),
    ("json_populate_recordset", "input settings"),
    ("json_to_record", "input settings"),
    ("json_to_recordset", "input settings"),
    ("jsonb_populate_record", "input settings"),
    ("jsonb_populate_recordset", "input settings"),
    ("jsonb_to_record", "input settings"),
    ("jsonb_to_recordset", "input settings"),
    ("xml", "xml settings"),
    ("xml_is_well_formed", "xml settings"),
    ("money", "lc_monetary setting"),
    ("numeric", "lc_monetary setting"),
    ("length", "database encoding"),
    ("convert", "conversions in the catalog"),
    ("convert_from", "database encoding"),
    ("convert_to", "database encoding"),
    ("getdatabaseencoding", "database encoding"),
    ("pg_client_encoding", "the applier's client encoding"),
    ("pg_char_to_encoding", "encoding names"),
    ("pg_encoding_to_char", "encoding names"),
    // Full text search: default_text_search_config is fixed; dictionaries come with the
    // PostgreSQL packages.
    ("to_tsvector", "text search configuration"),
    ("to_tsquery", "text search configuration"),
    ("plainto_tsquery", "text search configuration"),
    ("phraseto_tsquery", "text search configuration"),
    ("websearch_to_tsquery", "text search configuration"),
    ("json_to_tsvector", "text search configuration"),
    ("jsonb_to_tsvector", "text search configuration"),
    ("ts_headline", "text search configuration"),
    ("ts_debug", "text search configuration"),
    ("ts_parse", "text search parser"),
    ("ts_token_type", "text search parser"),
    ("ts_match_tt", "text search configuration"),
    ("ts_match_tq", "text search configuration"),
    ("get_current_ts_config", "text search configuration"),
    // The catalog read by name: names, definitions, privileges and comments are replicated.
    ("format_type", "catalog by name"),
    ("obj_description", "comments"),
    ("col_description", "comments"),
    ("shobj_description", "comments"),
    ("has_any_column_privilege", "privileges"),
    ("has_column_privilege", "privileges"),
    ("has_database_privilege", "privileges"),
    ("has_foreign_data_wrapper_privilege", "privileges"),
    ("has_function_privilege", "privileges"),
    ("has_language_privilege", "privileges"),
    ("has_parameter_privilege", "privileges"),
    ("has_schema_privilege", "privileges"),
    ("has_sequence_privilege", "privileges"),
    ("has_server_privilege", "privileges"),
    ("has_table_privilege", "privileges"),
    ("has_tablespace_privilege", "privileges"),
    ("has_type_privilege", "privileges"),
    ("pg_has_role", "role memberships"),
    ("row_security_active", "policies"),
    ("pg_get_constraintdef", "definitions"),
    ("pg_get_expr", "definitions"),
    ("pg_get_function_arg_default", "definitions"),
    ("pg_get_function_arguments", "definitions"),
    ("pg_get_function_identity_arguments", "definitions"),
    ("pg_get_function_result", "definitions"),
    ("pg_get_function_sqlbody", "definitions"),
    ("pg_get_functiondef", "definitions"),
    ("pg_get_indexdef", "definitions"),
    ("pg_get_partition_constraintdef", "definitions"),
    ("pg_get_partkeydef", "definitions"),
    ("pg_get_ruledef", "definitions"),
    ("pg_get_serial_sequence", "definitions"),
    ("pg_get_statisticsobjdef", "definitions"),
    ("pg_get_statisticsobjdef_columns", "definitions"),
    ("pg_get_statisticsobjdef_expressions", "definitions"),
    ("pg_get_triggerdef", "definitions"),
    ("pg_get_viewdef", "definitions"),
    ("pg_get_userbyid", "role names"),
    ("pg_get_keywords", "the grammar"),
    ("pg_get_catalog_foreign_keys", "the catalog's structure"),
    ("pg_get_replica_identity_index", "definitions"),
    ("pg_describe_object", "names"),
    ("pg_identify_object", "names"),
    ("pg_identify_object_as_address", "names"),
    ("pg_get_object_address", "names"),
    ("pg_options_to_table", "definitions"),
    ("pg_index_column_has_property", "definitions"),
    ("pg_index_has_property", "definitions"),
    ("pg_indexam_has_property", "definitions"),
    ("pg_column_is_updatable", "definitions"),
    ("pg_relation_is_updatable", "definitions"),
    ("pg_relation_is_publishable", "definitions"),
    ("pg_sequence_parameters", "definitions"),
    ("pg_sequence_last_value", "sequence positions (replicated)"),
    ("pg_partition_tree", "definitions"),
    ("pg_partition_ancestors", "definitions"),
    ("pg_settings_get_flags", "the setting's definition"),
    ("pg_typeof", "type names"),
    ("pg_collation_for", "collation names"),
    ("oidvectortypes", "type names"),
    ("amvalidate", "definitions"),
    ("pg_extension_config_dump", "extension scripts"),
    ("pg_collation_is_visible", "search path"),
    ("pg_conversion_is_visible", "search path"),
    ("pg_function_is_visible", "search path"),
    ("pg_opclass_is_visible", "search path"),
    ("pg_operator_is_visible", "search path"),
    ("pg_opfamily_is_visible", "search path"),
    ("pg_statistics_obj_is_visible", "search path"),
    ("pg_table_is_visible", "search path"),
    ("pg_ts_config_is_visible", "search path"),
    ("pg_ts_dict_is_visible", "search path"),
    ("pg_ts_parser_is_visible", "search path"),
    ("pg_ts_template_is_visible", "search path"),
    ("pg_type_is_visible", "search path"),
    ("regclass", "names"),
    ("to_regclass", "names"),
    ("to_regcollation", "names"),
    ("to_regnamespace", "names"),
    ("to_regoper", "names"),
    ("to_regoperator", "names"),
    ("to_regproc", "names"),
    ("to_regprocedure", "names"),
    ("to_regrole", "names"),
    ("to_regtype", "names"),
    ("enum_first", "enum definitions"),
    ("enum_last", "enum definitions"),
    ("enum_range", "enum definitions"),
    ("current_schema", "the applier's search path"),
    ("current_schemas", "the applier's search path"),
    ("current_user", "the write's role"),
    ("session_user", "the applier's role"),
    ("getpgusername", "the write's role"),
    (
        "current_database",
        "the database name (the same on every node)",
    ),
    ("pg_trigger_depth", "the write's own triggers"),
    // Extensions (EXTENSIONS_ALLOWED).
    ("unaccent", "the unaccent rules shipped with PostgreSQL"),
    ("populate_record", "input settings"),
    ("hstore_to_json", "output settings"),
    ("hstore_to_jsonb", "output settings"),
    (
        "similarity_op",
        "pg_trgm's threshold (its default, or SET LOCAL in the write)",
    ),
    (
        "word_similarity_op",
        "pg_trgm's threshold (its default, or SET LOCAL in the write)",
    ),
    (
        "word_similarity_commutator_op",
        "pg_trgm's threshold (its default, or SET LOCAL in the write)",
    ),
    (
        "strict_word_similarity_op",
        "pg_trgm's threshold (its default, or SET LOCAL in the write)",
    ),
    (
        "strict_word_similarity_commutator_op",
        "pg_trgm's threshold (its default, or SET LOCAL in the write)",
    ),
];

/// Reads what differs between nodes: refused in writes. (name, why).
const PER_NODE: &[(&str, &str)] = &[
    ("version", "the server's build"),
    ("current_setting", "this server's settings"),
    ("pg_show_all_settings", "this server's settings"),
    (
        "pg_show_all_file_settings",
        "this server's configuration files",
    ),
    ("pg_hba_file_rules", "this server's configuration files"),
    (
        "pg_ident_file_mappings",
        "this server's configuration files",
    ),
    ("pg_config", "this server's build"),
    (
        "pg_available_extensions",
        "packages installed on this machine",
    ),
    (
        "pg_available_extension_versions",
        "packages installed on this machine",
    ),
    (
        "pg_extension_update_paths",
        "packages installed on this machine",
    ),
    ("pg_timezone_names", "time zone files on this machine"),
    ("pg_timezone_abbrevs", "time zone files on this machine"),
    (
        "pg_collation_actual_version",
        "this machine's collation library",
    ),
    (
        "pg_database_collation_actual_version",
        "this machine's collation library",
    ),
    ("pg_import_system_collations", "this machine's locales"),
    ("pg_jit_available", "this server's build"),
    ("pg_backend_pid", "this connection"),
    ("inet_client_addr", "this connection"),
    ("inet_client_port", "this connection"),
    ("inet_server_addr", "this connection"),
    ("inet_server_port", "this connection"),
    ("pg_postmaster_start_time", "this server's start"),
    ("pg_conf_load_time", "this server's configuration"),
    ("timeofday", "this server's clock"),
    (
        "age",
        "this server's clock or transaction counter with one argument",
    ),
    ("mxid_age", "this server's transaction counter"),
    ("pg_current_xact_id", "this server's transaction counter"),
    (
        "pg_current_xact_id_if_assigned",
        "this server's transaction counter",
    ),
    ("txid_current", "this server's transaction counter"),
    (
        "txid_current_if_assigned",
        "this server's transaction counter",
    ),
    ("txid_current_snapshot", "this server's transaction counter"),
    ("pg_current_snapshot", "this server's transaction counter"),
    ("txid_status", "this server's transaction counter"),
    ("pg_xact_status", "this server's transaction counter"),
    (
        "pg_xact_commit_timestamp",
        "this server's transaction counter",
    ),
    (
        "pg_xact_commit_timestamp_origin",
        "this server's transaction counter",
    ),
    (
        "pg_last_committed_xact",
        "this server's transaction counter",
    ),
    (
        "pg_get_multixact_members",
        "this server's transaction counter",
    ),
    ("pg_export_snapshot", "this server's transactions"),
    ("pg_nextoid", "this server's object id counter"),
    ("pg_my_temp_schema", "this connection's temporary schema"),
    (
        "pg_is_other_temp_schema",
        "temporary schemas of this server",
    ),
    ("pg_listening_channels", "this connection"),
    (
        "pg_notification_queue_usage",
        "this server's notification queue",
    ),
    ("pg_cursor", "this connection's cursors"),
    (
        "pg_prepared_statement",
        "this connection's prepared statements",
    ),
    ("pg_prepared_xact", "this server's prepared transactions"),
    ("pg_lock_status", "this server's locks"),
    ("pg_blocking_pids", "this server's locks"),
    ("pg_safe_snapshot_blocking_pids", "this server's locks"),
    (
        "pg_isolation_test_session_is_blocked",
        "this server's locks",
    ),
    ("pg_get_shmem_allocations", "this server's memory"),
    ("pg_get_backend_memory_contexts", "this server's memory"),
    ("pg_log_backend_memory_contexts", "this server's memory"),
    ("pg_relation_size", "the physical size on this node's disk"),
    ("pg_table_size", "the physical size on this node's disk"),
    ("pg_indexes_size", "the physical size on this node's disk"),
    (
        "pg_total_relation_size",
        "the physical size on this node's disk",
    ),
    ("pg_database_size", "the physical size on this node's disk"),
    (
        "pg_tablespace_size",
        "the physical size on this node's disk",
    ),
    ("pg_column_size", "the physical size of a stored value"),
    (
        "pg_column_compression",
        "how this node compressed a stored value",
    ),
    ("pg_relation_filenode", "this node's files"),
    ("pg_relation_filepath", "this node's files"),
    ("pg_filenode_relation", "this node's files"),
    ("pg_tablespace_location", "this node's directories"),
    ("pg_tablespace_databases", "this node's object ids"),
    ("pg_stat_file", "this node's files"),
    ("pg_read_file", "this node's files"),
    ("pg_read_file_old", "this node's files"),
    ("pg_read_binary_file", "this node's files"),
    ("pg_current_logfile", "this node's files"),
    ("currtid2", "physical row addresses"),
    ("aclexplode", "role object ids"),
    ("pg_mcv_list_items", "this node's statistics"),
    ("current_query", "the applier's own query text"),
    ("pg_is_in_recovery", "this server's state"),
    ("pg_is_wal_replay_paused", "this server's state"),
    ("pg_get_wal_replay_pause_state", "this server's state"),
    ("pg_get_wal_resource_managers", "this server's build"),
    ("pg_last_wal_receive_lsn", "this server's write-ahead log"),
    ("pg_last_wal_replay_lsn", "this server's write-ahead log"),
    (
        "pg_last_xact_replay_timestamp",
        "this server's write-ahead log",
    ),
    ("pg_current_wal_lsn", "this server's write-ahead log"),
    ("pg_current_wal_insert_lsn", "this server's write-ahead log"),
    ("pg_current_wal_flush_lsn", "this server's write-ahead log"),
    (
        "pg_get_replication_slots",
        "this server's replication slots",
    ),
    ("pg_get_publication_tables", "this server's object ids"),
    ("pg_replication_origin_oid", "this server's object ids"),
    (
        "pg_replication_origin_progress",
        "this server's replication",
    ),
    (
        "pg_replication_origin_session_is_setup",
        "this server's replication",
    ),
    (
        "pg_replication_origin_session_progress",
        "this server's replication",
    ),
    (
        "pg_show_replication_origin_status",
        "this server's replication",
    ),
    ("pg_control_checkpoint", "this server's control file"),
    ("pg_control_init", "this server's control file"),
    ("pg_control_recovery", "this server's control file"),
    ("pg_control_system", "this server's control file"),
    ("pg_event_trigger_ddl_commands", "event triggers (refused)"),
    (
        "pg_event_trigger_dropped_objects",
        "event triggers (refused)",
    ),
    (
        "pg_event_trigger_table_rewrite_oid",
        "event triggers (refused)",
    ),
    (
        "pg_event_trigger_table_rewrite_reason",
        "event triggers (refused)",
    ),
    ("cursor_to_xml", "this connection's cursors"),
    ("cursor_to_xmlschema", "this connection's cursors"),
    ("table_to_xml", "rows in this node's physical order"),
    (
        "table_to_xml_and_xmlschema",
        "rows in this node's physical order",
    ),
    ("table_to_xmlschema", "this node's object ids"),
    ("schema_to_xml", "rows in this node's physical order"),
    (
        "schema_to_xml_and_xmlschema",
        "rows in this node's physical order",
    ),
    ("schema_to_xmlschema", "this node's object ids"),
    ("database_to_xml", "rows in this node's physical order"),
    (
        "database_to_xml_and_xmlschema",
        "rows in this node's physical order",
    ),
    ("database_to_xmlschema", "this node's object ids"),
    ("pg_sleep", "stalls every node's applier"),
    ("pg_sleep_for", "stalls every node's applier"),
    ("pg_sleep_until", "stalls every node's applier"),
    (
        "pg_advisory_xact_lock",
        "locks of this server (use a row as a lock)",
    ),
    (
        "pg_advisory_xact_lock_shared",
        "locks of this server (use a row as a lock)",
    ),
    (
        "pg_try_advisory_xact_lock",
        "locks of this server (use a row as a lock)",
    ),
    (
        "pg_try_advisory_xact_lock_shared",
        "locks of this server (use a row as a lock)",
    ),
    ("pg_notify", "signals this server's listeners"),
    ("gin_clean_pending_list", "this node's index pages"),
    ("brin_summarize_new_values", "this node's index pages"),
    ("brin_summarize_range", "this node's index pages"),
    ("brin_desummarize_range", "this node's index pages"),
    // Large objects get object ids of their own server and live outside tables.
    ("lo_close", "large objects (use bytea)"),
    ("lo_creat", "large objects (use bytea)"),
    ("lo_create", "large objects (use bytea)"),
    ("lo_export", "large objects (use bytea)"),
    ("lo_from_bytea", "large objects (use bytea)"),
    ("lo_get", "large objects (use bytea)"),
    ("lo_import", "large objects (use bytea)"),
    ("lo_lseek", "large objects (use bytea)"),
    ("lo_lseek64", "large objects (use bytea)"),
    ("lo_open", "large objects (use bytea)"),
    ("lo_put", "large objects (use bytea)"),
    ("lo_tell", "large objects (use bytea)"),
    ("lo_tell64", "large objects (use bytea)"),
    ("lo_truncate", "large objects (use bytea)"),
    ("lo_truncate64", "large objects (use bytea)"),
    ("lo_unlink", "large objects (use bytea)"),
    ("loread", "large objects (use bytea)"),
    ("lowrite", "large objects (use bytea)"),
    // Server administration.
    ("pg_cancel_backend", "this server's connections"),
    ("pg_terminate_backend", "this server's connections"),
    ("pg_reload_conf", "this server's configuration"),
    ("pg_rotate_logfile", "this server's files"),
    ("pg_rotate_logfile_old", "this server's files"),
    ("pg_switch_wal", "this server's write-ahead log"),
    ("pg_create_restore_point", "this server's write-ahead log"),
    ("pg_backup_start", "this server's write-ahead log"),
    ("pg_backup_stop", "this server's write-ahead log"),
    ("pg_promote", "this server's state"),
    ("pg_wal_replay_pause", "this server's state"),
    ("pg_wal_replay_resume", "this server's state"),
    ("pg_logical_emit_message", "this server's write-ahead log"),
    ("pg_stop_making_pinned_objects", "initdb only"),
    // Extensions (EXTENSIONS_ALLOWED).
    (
        "gen_random_bytes",
        "this server's random generator (bind random bytes from the client)",
    ),
    (
        "gen_salt",
        "this server's random generator (make the salt in the client)",
    ),
    (
        "pgp_sym_encrypt",
        "random session keys of this server (encrypt in the client)",
    ),
    (
        "pgp_sym_encrypt_bytea",
        "random session keys of this server (encrypt in the client)",
    ),
    (
        "pgp_pub_encrypt",
        "random session keys of this server (encrypt in the client)",
    ),
    (
        "pgp_pub_encrypt_bytea",
        "random session keys of this server (encrypt in the client)",
    ),
    ("normal_rand", "this server's random generator"),
    ("uuid_generate_v1", "this machine's MAC address and clock"),
    (
        "uuid_generate_v1mc",
        "this server's clock and random generator",
    ),
    ("show_limit", "this connection's setting"),
    ("isn_weak", "this connection's setting"),
];

/// Leave state behind in the session: refused in writes and reads.
const SESSION: &[(&str, &str)] = &[
    (
        "pg_advisory_lock",
        "takes a lock held until the connection ends",
    ),
    (
        "pg_advisory_lock_shared",
        "takes a lock held until the connection ends",
    ),
    (
        "pg_try_advisory_lock",
        "takes a lock held until the connection ends",
    ),
    (
        "pg_try_advisory_lock_shared",
        "takes a lock held until the connection ends",
    ),
    ("pg_advisory_unlock", "releases locks of the connection"),
    (
        "pg_advisory_unlock_shared",
        "releases locks of the connection",
    ),
    ("pg_advisory_unlock_all", "releases locks of the connection"),
    ("setseed", "sets the connection's random seed"),
    ("set_limit", "sets a connection setting"),
    (
        "pg_stat_clear_snapshot",
        "changes the connection's statistics snapshot",
    ),
    (
        "pg_stat_force_next_flush",
        "changes the connection's statistics",
    ),
    (
        "pg_replication_origin_session_setup",
        "sets up the connection's replication origin",
    ),
    (
        "pg_replication_origin_session_reset",
        "sets up the connection's replication origin",
    ),
    (
        "pg_replication_origin_xact_setup",
        "sets up the connection's replication origin",
    ),
    (
        "pg_replication_origin_xact_reset",
        "sets up the connection's replication origin",
    ),
];

/// Run SQL given as text, or change the role a statement runs as: refused everywhere.
const ESCAPES: &[(&str, &str)] = &[
    ("set_config", "could change the role a statement runs as"),
    ("query_to_xml", "runs SQL given as text"),
    ("query_to_xml_and_xmlschema", "runs SQL given as text"),
    ("query_to_xmlschema", "runs SQL given as text"),
    ("ts_stat", "runs SQL given as text"),
    ("ts_rewrite", "runs SQL given as text"),
    ("crosstab", "runs SQL given as text"),
    ("crosstab2", "runs SQL given as text"),
    ("crosstab3", "runs SQL given as text"),
    ("crosstab4", "runs SQL given as text"),
    ("connectby", "runs SQL put together from its arguments"),
];

/// Rewritten at the leader (sql::gate).
const REWRITTEN: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "random",
    "gen_random_uuid",
    "uuid_generate_v4",
];

/// The verdict for one function, and why.
pub fn classify(f: &FunctionEntry) -> (Verdict, &'static str) {
    let find = |list: &[(&'static str, &'static str)]| {
        list.iter().find(|(n, _)| *n == f.name).map(|(_, why)| *why)
    };
    if f.volatility == 'i' {
        return (Verdict::Immutable, "");
    }
    if let Some(why) = find(ESCAPES) {
        return (Verdict::Escape, why);
    }
    if let Some(why) = find(SESSION) {
        return (Verdict::Session, why);
    }
    if f.name.ends_with("_validator") {
        return (
            Verdict::Internal,
            "a language validator, not called directly",
        );
    }
    if REWRITTEN.contains(&f.name.as_str()) && f.args.is_empty() {
        return (
            Verdict::Rewritten,
            "replaced by raftpg's deterministic version",
        );
    }
    if matches!(
        f.name.as_str(),
        "nextval" | "setval" | "currval" | "lastval"
    ) {
        return (Verdict::Sequence, "sequence positions are replicated");
    }
    if f.name == "age" && f.args.len() == 2 {
        return (Verdict::Deterministic, "time zone setting");
    }
    if let Some(why) = find(PER_NODE) {
        return (Verdict::PerNode, why);
    }
    if f.name.starts_with("pg_stat_") || f.name.starts_with("pg_statio_") {
        return (Verdict::PerNode, "this node's statistics");
    }
    if f.name.starts_with("binary_upgrade_") {
        return (Verdict::PerNode, "pg_upgrade only");
    }
    if f.name.starts_with("pg_ls_") {
        return (Verdict::PerNode, "this node's files");
    }
    if f.name.starts_with("pg_logical_")
        || f.name.starts_with("pg_replication_origin_")
        || f.name.contains("replication_slot")
    {
        return (Verdict::PerNode, "this server's replication");
    }
    let internal_type = |t: &String| INTERNAL_TYPES.contains(&t.as_str());
    if f.args.iter().any(internal_type) || internal_type(&f.returns) {
        return (
            Verdict::Internal,
            "a type input, planner, index, trigger or handler function, not called directly",
        );
    }
    if let Some(why) = find(DETERMINISTIC) {
        return (Verdict::Deterministic, why);
    }
    // Comparison and arithmetic between time types (operators' functions), and type output
    // and binary send functions: the applier's settings are fixed.
    let time_pair = ["timestamptz_", "timestamp_", "date_", "interval_pl_"]
        .iter()
        .any(|p| f.name.starts_with(p))
        && f.args.iter().any(|a| a.contains("time zone"));
    if time_pair {
        return (Verdict::Deterministic, "time zone setting");
    }
    if f.name.ends_with("send") && f.returns == "bytea" {
        return (Verdict::Deterministic, "output settings");
    }
    if f.owner == "information_schema" && f.name.starts_with("_pg_") {
        return (Verdict::Deterministic, "definitions");
    }
    (Verdict::Unreviewed, "not immutable and not reviewed")
}

/// The system relations a write may read: views whose rows are names and definitions only —
/// no object ids (every catalog table has them, and they differ between nodes once a node's
/// PostgreSQL crashed or restored a snapshot), no sizes, statistics, settings, files or
/// connections. `information_schema` views that build names from object ids (the
/// `specific_name` of routines, the names of NOT NULL constraints) are left out.
/// `tests/tests/determinism_proof.rs` stores the whole content of every system relation on a
/// cluster whose nodes differ physically: these must come out identical.
pub const RELATIONS_ALLOWED: &[&str] = &[
    "pg_catalog.pg_indexes",
    "pg_catalog.pg_matviews",
    "pg_catalog.pg_policies",
    "pg_catalog.pg_rules",
    "pg_catalog.pg_sequences",
    "pg_catalog.pg_tables",
    "pg_catalog.pg_views",
    "information_schema.administrable_role_authorizations",
    "information_schema.applicable_roles",
    "information_schema.attributes",
    "information_schema.character_sets",
    "information_schema.check_constraint_routine_usage",
    "information_schema.collation_character_set_applicability",
    "information_schema.collations",
    "information_schema.column_column_usage",
    "information_schema.column_domain_usage",
    "information_schema.column_options",
    "information_schema.column_privileges",
    "information_schema.column_udt_usage",
    "information_schema.columns",
    "information_schema.constraint_column_usage",
    "information_schema.constraint_table_usage",
    "information_schema.domain_constraints",
    "information_schema.domain_udt_usage",
    "information_schema.domains",
    "information_schema.enabled_roles",
    "information_schema.information_schema_catalog_name",
    "information_schema.key_column_usage",
    "information_schema.referential_constraints",
    "information_schema.role_column_grants",
    "information_schema.role_table_grants",
    "information_schema.role_udt_grants",
    "information_schema.role_usage_grants",
    "information_schema.schemata",
    "information_schema.sequences",
    "information_schema.sql_features",
    "information_schema.sql_implementation_info",
    "information_schema.sql_sizing",
    "information_schema.table_privileges",
    "information_schema.tables",
    "information_schema.triggered_update_columns",
    "information_schema.triggers",
    "information_schema.udt_privileges",
    "information_schema.usage_privileges",
    "information_schema.user_defined_types",
    "information_schema.view_column_usage",
    "information_schema.view_table_usage",
    "information_schema.views",
];

/// The committed list of system relations (generated like `functions.tsv`): `schema.name`
/// per line.
pub const RELATIONS_TXT: &str = include_str!("relations.txt");

static SYSTEM_RELATIONS: LazyLock<std::collections::HashSet<&'static str>> = LazyLock::new(|| {
    RELATIONS_TXT
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect()
});

/// Whether `schema.name` (schema `None`: unqualified, which PostgreSQL resolves in
/// `pg_catalog` first) is a system relation a write may not read. `None` when it is not a
/// system relation or is allowed; otherwise the qualified name.
pub fn relation_refused(schema: Option<&str>, name: &str) -> Option<String> {
    let qualified = match schema {
        None => format!("pg_catalog.{name}"),
        Some(s @ ("pg_catalog" | "information_schema")) => format!("{s}.{name}"),
        Some(_) => return None,
    };
    (SYSTEM_RELATIONS.contains(qualified.as_str())
        && !RELATIONS_ALLOWED.contains(&qualified.as_str()))
    .then_some(qualified)
}

/// One classified function of the committed file.
#[derive(Debug, Clone)]
pub struct Classified {
    /// `pg_catalog`, `information_schema` or `ext:<name>`.
    pub owner: String,
    /// `name(types)`.
    pub signature: String,
    /// Arguments without defaults.
    pub min_args: usize,
    /// Most arguments (`None`: variadic).
    pub max_args: Option<usize>,
    /// `i`, `s`, `v`.
    pub volatility: char,
    /// The verdict.
    pub verdict: Verdict,
    /// Why.
    pub why: String,
}

impl Classified {
    /// The function's name.
    pub fn name(&self) -> &str {
        self.signature
            .split_once('(')
            .map(|(n, _)| n)
            .unwrap_or(&self.signature)
    }

    fn accepts(&self, arity: usize) -> bool {
        arity >= self.min_args && self.max_args.is_none_or(|m| arity <= m)
    }

    /// The line of `functions.tsv` for it.
    pub fn line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.verdict.as_str(),
            self.owner,
            self.signature,
            self.min_args,
            self.max_args
                .map(|m| m.to_string())
                .unwrap_or_else(|| "*".into()),
            self.volatility,
            self.why
        )
    }

    /// Parses a line of `functions.tsv`.
    pub fn parse(line: &str) -> Option<Classified> {
        let mut f = line.split('\t');
        let verdict = Verdict::parse(f.next()?)?;
        let owner = f.next()?.to_string();
        let signature = f.next()?.to_string();
        let min_args = f.next()?.parse().ok()?;
        let max_args = match f.next()? {
            "*" => None,
            m => Some(m.parse().ok()?),
        };
        let volatility = f.next()?.chars().next()?;
        let why = f.next().unwrap_or("").to_string();
        Some(Classified {
            owner,
            signature,
            min_args,
            max_args,
            volatility,
            verdict,
            why,
        })
    }
}

impl From<&FunctionEntry> for Classified {
    fn from(f: &FunctionEntry) -> Self {
        let (verdict, why) = classify(f);
        Classified {
            owner: f.owner.clone(),
            signature: f.signature(),
            min_args: f.min_args,
            max_args: f.max_args,
            volatility: f.volatility,
            verdict,
            why: why.to_string(),
        }
    }
}

/// The committed classification (generated; see the module doc).
pub const FUNCTIONS_TSV: &str = include_str!("functions.tsv");

/// Header line of `functions.tsv`.
pub const FUNCTIONS_TSV_HEADER: &str =
    "# verdict\towner\tsignature\tmin_args\tmax_args\tvolatility\twhy";

/// The committed classification by function name.
static BY_NAME: LazyLock<HashMap<String, Vec<Classified>>> = LazyLock::new(|| {
    let mut by_name: HashMap<String, Vec<Classified>> = HashMap::new();
    for c in FUNCTIONS_TSV
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(Classified::parse)
    {
        // The gate compares names in lower case (only the RI_FKey_* trigger functions have
        // capitals).
        by_name
            .entry(c.name().to_ascii_lowercase())
            .or_default()
            .push(c);
    }
    by_name
});

/// The verdict of a call of `name` (lower case) with `arity` arguments, among the built-in
/// functions (`builtin`: unqualified or `pg_catalog.`) and the allowed extensions' functions:
/// the strictest verdict of the overloads that accept `arity` arguments, with the reason, or
/// `None` when no classified function matches (a function of the user's own).
pub fn lookup(name: &str, arity: usize, builtin: bool) -> Option<(Verdict, &'static str)> {
    let overloads = BY_NAME.get(name)?;
    overloads
        .iter()
        .filter(|c| c.accepts(arity))
        .filter(|c| builtin || c.owner.starts_with("ext:"))
        .max_by_key(|c| c.verdict)
        .map(|c| (c.verdict, c.why.as_str()))
}

/// The strictest verdict of any classified function called `name` (for function bodies,
/// where the number of arguments is not known).
pub fn body_verdict(name: &str) -> Option<(Verdict, &'static str)> {
    BY_NAME
        .get(name)?
        .iter()
        .max_by_key(|c| c.verdict)
        .map(|c| (c.verdict, c.why.as_str()))
}

/// All classified functions (for the docs and the tests).
pub fn all() -> impl Iterator<Item = &'static Classified> {
    BY_NAME.values().flatten()
}
