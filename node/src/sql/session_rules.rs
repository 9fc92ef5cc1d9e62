//! What a write may change in the applier's PostgreSQL session, and how raftpg makes sure
//! nothing it changes outlives the write.
//!
//! Owns three lists that must agree with each other:
//! - [`FIXED_SETTINGS`]: the settings every applier session runs with, passed as connection
//!   startup options so that they are also the session's *reset values* (`SET LOCAL x TO
//!   DEFAULT` puts a setting back exactly to them);
//! - [`SET_LOCAL_ALLOWED`]: the settings a write may change with `SET LOCAL` (or a function's
//!   `SET` clause) — planner and memory knobs, and settings whose effect on the write itself is
//!   the same on every node. Everything else is refused at the leader (timeouts would turn into
//!   cancellations, which are environmental errors; read-only and role changes would break
//!   raftpg's own bookkeeping; locale settings name node-local files);
//! - [`GUARDED_STATE_SQL`]: the session state compared before and after every write (design.md
//!   "Errors outside a statement"): `SET LOCAL` survives `RELEASE SAVEPOINT` until the batch's
//!   transaction ends, and batches group different writes on different nodes, so a setting a
//!   write leaves behind would change later writes on some nodes only. The applier resets every
//!   setting a write named with `SET LOCAL` at the write's end, then `raftpg.end_write` checks
//!   this state (which also catches changes made by dynamic SQL inside functions) and fails the
//!   write — deterministically, on every node — if anything is left changed.

/// Settings of every applier session (name, value). Sent as startup options, so they are also
/// what `SET LOCAL name TO DEFAULT` restores.
pub const FIXED_SETTINGS: &[(&str, &str)] = &[
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("idle_session_timeout", "0"),
    ("synchronous_commit", "off"),
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("client_min_messages", "warning"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_read_only", "off"),
    ("search_path", "public"),
    ("bytea_output", "hex"),
    ("xmlbinary", "base64"),
    ("xmloption", "content"),
    ("standard_conforming_strings", "on"),
    ("check_function_bodies", "on"),
    ("row_security", "on"),
    ("session_replication_role", "origin"),
    ("default_text_search_config", "pg_catalog.english"),
    ("array_nulls", "on"),
    ("transform_null_equals", "off"),
    ("gin_fuzzy_search_limit", "0"),
    ("jit", "off"),
    // Locale-dependent formatting (money, to_char's TM and L patterns, to_number).
    ("lc_monetary", "C"),
    ("lc_numeric", "C"),
    ("lc_time", "C"),
];

/// The `options` startup parameter that sets [`FIXED_SETTINGS`] (spaces escaped for libpq).
pub fn startup_options() -> String {
    FIXED_SETTINGS
        .iter()
        .map(|(name, value)| format!("-c {name}={}", value.replace(' ', "\\ ")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Settings a write may change with `SET LOCAL` (lower case). Names with a dot (custom
/// settings such as `myapp.tenant`) are allowed too, except raftpg's own (`raftpg.*`).
const SET_LOCAL_ALLOWED: &[&str] = &[
    // Memory.
    "work_mem",
    "maintenance_work_mem",
    "hash_mem_multiplier",
    // Planner (the plan may change, the result of a deterministic statement may not).
    "seq_page_cost",
    "random_page_cost",
    "cpu_tuple_cost",
    "cpu_index_tuple_cost",
    "cpu_operator_cost",
    "parallel_setup_cost",
    "parallel_tuple_cost",
    "min_parallel_table_scan_size",
    "min_parallel_index_scan_size",
    "effective_cache_size",
    "effective_io_concurrency",
    "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers",
    "from_collapse_limit",
    "join_collapse_limit",
    "geqo",
    "geqo_threshold",
    "plan_cache_mode",
    "cursor_tuple_fraction",
    "constraint_exclusion",
    "recursive_worktable_factor",
    "jit",
    // Settings whose effect on the write is the same on every node (reset after the write).
    "search_path",
    "timezone",
    "datestyle",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "xmlbinary",
    "xmloption",
    "default_text_search_config",
    "check_function_bodies",
    "row_security",
    "application_name",
];

/// Why `SET LOCAL name` (or a function's `SET name`) is refused, or `None` if it is allowed.
pub fn set_local_refusal(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("raftpg.") {
        return Some(format!(
            "{name} belongs to raftpg's own bookkeeping and cannot be set by a write"
        ));
    }
    if lower.contains('.')
        || lower.starts_with("enable_")
        || SET_LOCAL_ALLOWED.contains(&lower.as_str())
    {
        return None;
    }
    Some(format!(
        "SET LOCAL {name} is not allowed in a write: only planner and memory settings, search_path, time zone and output formats can be set (a timeout, read-only mode, role, or locale setting would act differently on each node or break raftpg's bookkeeping); see docs/determinism.md"
    ))
}

/// An SQL expression giving the session state a write must leave as it found it: the role and
/// the settings that change what later writes do or that raftpg's bookkeeping relies on
/// (session-level changes made by dynamic SQL would even outlive the batch), and whether a
/// temporary schema exists (only dynamic SQL could have created one). Compared by
/// `raftpg.end_write` against the value the applier read when it connected. A plain
/// expression — no subquery, no function of ours — so PL/pgSQL evaluates it in a few
/// microseconds (it runs after every write on every node).
pub const GUARDED_STATE_SQL: &str = "concat_ws('|', current_user,
    current_setting('search_path'), current_setting('TimeZone'), current_setting('DateStyle'),
    current_setting('IntervalStyle'), current_setting('extra_float_digits'),
    current_setting('bytea_output'), current_setting('xmloption'),
    current_setting('statement_timeout'), current_setting('lock_timeout'),
    current_setting('idle_in_transaction_session_timeout'), current_setting('transaction_read_only'),
    current_setting('default_transaction_read_only'), current_setting('default_transaction_isolation'),
    current_setting('session_replication_role'), current_setting('row_security'),
    current_setting('standard_conforming_strings'), current_setting('client_encoding'),
    current_setting('lc_monetary'), current_setting('lc_numeric'), current_setting('lc_time'),
    current_setting('default_text_search_config'), current_setting('array_nulls'),
    current_setting('transform_null_equals'), current_setting('gin_fuzzy_search_limit'),
    pg_catalog.pg_my_temp_schema())";

/// PL/pgSQL statements that name the `INITIALLY DEFERRED` constraints (the text[] in the
/// session setting `raftpg.deferred`) `DEFERRED`, after `SET CONSTRAINTS ALL IMMEDIATE`.
/// Written inline (not as a function call: a nested PL/pgSQL call costs more than the rest).
const DEFER_LISTED: &str = "
        deferred := current_setting('raftpg.deferred', true);
        IF deferred IS NOT NULL AND deferred <> '' AND deferred <> '{}' THEN
            EXECUTE 'SET CONSTRAINTS ' || array_to_string(deferred::text[], ', ') || ' DEFERRED';
        END IF;";

/// raftpg's functions and event triggers that keep writes from leaving anything behind or
/// reaching raftpg's schema (created by the applier at every connection, in schema `raftpg`
/// whose namespace oid is `raftpg_oid`):
///
/// - `raftpg.session_state()`: [`GUARDED_STATE_SQL`].
/// - `raftpg.reset_constraints()`: puts every constraint back to its declared mode — `SET
///   CONSTRAINTS ALL IMMEDIATE`, then the `INITIALLY DEFERRED` ones (listed in the session
///   setting `raftpg.deferred`, kept current by the DDL event trigger) `DEFERRED`. Run when a
///   write starts (`raftpg.begin_entry`, the fast path's setup) and when it ends, so every
///   write starts from the same modes whatever the batch it is applied in.
/// - `raftpg.end_write(expected)`: at the end of every write, fires its deferred constraint
///   checks (so a violation is the write's error, not the batch's COMMIT's), raises
///   `RP002` if [`GUARDED_STATE_SQL`] differs from `expected`, and resets the constraint modes.
/// - event trigger `raftpg_ddl` (`ddl_command_end`): refuses, inside a write (when
///   `raftpg.ts_us` is set), any DDL on an object of schema raftpg — also DDL run by dynamic
///   SQL inside functions, which the leader's gate cannot see — refreshes
///   `raftpg.deferred` (a session setting: rolled back with the write that changed it), and
///   clears the list of sequences `raftpg.sequence_positions()` caches (`raftpg.seq_oids`).
/// - event trigger `raftpg_drop` (`sql_drop`): the same for DROP.
pub fn guard_functions_sql(raftpg_oid: u32) -> String {
    format!(
        r#"
    CREATE OR REPLACE FUNCTION raftpg.session_state() RETURNS text LANGUAGE sql STABLE
        AS $$ SELECT {GUARDED_STATE_SQL} $$;
    -- The INITIALLY DEFERRED constraints as a text[] of qualified names that SET CONSTRAINTS
    -- can name: a name shared (in its schema) with a constraint that is not deferrable cannot
    -- be named, so such a constraint is checked at the end of each statement instead.
    CREATE OR REPLACE FUNCTION raftpg.deferred_constraints() RETURNS text[] LANGUAGE sql STABLE AS $$
        SELECT coalesce(array_agg(format('%I.%I', n.nspname, c.conname) ORDER BY 1), '{{}}')
        FROM (SELECT connamespace, conname FROM pg_catalog.pg_constraint GROUP BY 1, 2
              HAVING bool_or(condeferred) AND bool_and(condeferrable)) c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.connamespace $$;
    CREATE OR REPLACE FUNCTION raftpg.defer(names text[]) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF cardinality(names) > 0 THEN
            EXECUTE 'SET CONSTRAINTS ' || array_to_string(names, ', ') || ' DEFERRED';
        END IF;
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.reset_constraints() RETURNS void LANGUAGE plpgsql AS $$
    DECLARE deferred text;
    BEGIN
        SET CONSTRAINTS ALL IMMEDIATE;{DEFER_LISTED}
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.end_write(expected text) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE deferred text;
    BEGIN
        SET CONSTRAINTS ALL IMMEDIATE;
        IF {GUARDED_STATE_SQL} IS DISTINCT FROM expected THEN
            RAISE EXCEPTION 'a write must leave the session as it found it (settings other than SET LOCAL of an allowed setting, the role, temporary tables)'
                USING ERRCODE = 'RP002', DETAIL = format('expected %s, found %s', expected, {GUARDED_STATE_SQL});
        END IF;{DEFER_LISTED}
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
    DECLARE
        before text[] := coalesce(nullif(current_setting('raftpg.deferred', true), ''), '{{}}')::text[];
        after text[] := raftpg.deferred_constraints();
    BEGIN
        IF coalesce(current_setting('raftpg.ts_us', true), '') <> '' AND EXISTS (
            SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() c
            WHERE c.schema_name = 'raftpg'
               OR (c.classid = 'pg_catalog.pg_namespace'::regclass AND c.objid = {raftpg_oid}))
        THEN
            RAISE EXCEPTION 'the schema raftpg holds raftpg''s own bookkeeping and cannot be changed by a write'
                USING ERRCODE = '42501';
        END IF;
        PERFORM pg_catalog.set_config('raftpg.deferred', after::text, false);
        -- DDL may have created, dropped or renamed a sequence: forget the list
        -- raftpg.sequence_positions() caches (apply::state_machine).
        PERFORM pg_catalog.set_config('raftpg.seq_oids', '', false);
        -- Constraints created deferred by this command start deferred, whatever SET
        -- CONSTRAINTS ALL said before.
        PERFORM raftpg.defer(ARRAY(SELECT x FROM unnest(after) x WHERE x <> ALL (before)));
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.on_drop() RETURNS event_trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF coalesce(current_setting('raftpg.ts_us', true), '') <> '' AND EXISTS (
            SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
            WHERE d.schema_name = 'raftpg' OR (d.object_type = 'schema' AND d.objid = {raftpg_oid}))
        THEN
            RAISE EXCEPTION 'the schema raftpg holds raftpg''s own bookkeeping and cannot be dropped by a write'
                USING ERRCODE = '42501';
        END IF;
        PERFORM pg_catalog.set_config('raftpg.seq_oids', '', false);
    END $$;
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'raftpg_ddl') THEN
            CREATE EVENT TRIGGER raftpg_ddl ON ddl_command_end EXECUTE FUNCTION raftpg.on_ddl();
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'raftpg_drop') THEN
            CREATE EVENT TRIGGER raftpg_drop ON sql_drop EXECUTE FUNCTION raftpg.on_drop();
        END IF;
    END $$;
    SELECT pg_catalog.set_config('raftpg.deferred', raftpg.deferred_constraints()::text, false);
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        assert!(set_local_refusal("work_mem").is_none());
        assert!(set_local_refusal("enable_seqscan").is_none());
        assert!(set_local_refusal("search_path").is_none());
        assert!(set_local_refusal("myapp.tenant").is_none());
        for refused in [
            "statement_timeout",
            "lock_timeout",
            "role",
            "session_authorization",
            "transaction_read_only",
            "default_transaction_read_only",
            "session_replication_role",
            "lc_monetary",
            "raftpg.ts_us",
            "standard_conforming_strings",
            "synchronous_commit",
        ] {
            assert!(set_local_refusal(refused).is_some(), "{refused}");
        }
    }

    #[test]
    fn startup_options_escape_spaces() {
        let o = startup_options();
        assert!(o.contains("-c DateStyle=ISO,\\ MDY"));
        assert!(o.contains("-c search_path=public"));
    }
}
