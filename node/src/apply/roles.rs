//! Roles travel with the database: PostgreSQL keeps roles cluster-wide (`pg_authid`,
//! `pg_auth_members`), outside the database `pg_dump` copies, so a snapshot alone would give a
//! new node the tables but not the roles that own them, hold privileges on them, or log in.
//!
//! Owns `raftpg.applied.roles`: the state of the cluster's user roles (every role but
//! raftpg's own and PostgreSQL's predefined `pg_*`; their attributes, SCRAM verifier and
//! memberships, including membership in `raftpg_admin`), as deterministic JSON. It is recorded
//! with every batch that ran a statement other than DML (`raftpg.record_roles()` in
//! `applier::RECORD_APPLIED_ROLES_SQL`; role statements are never DML and the gate keeps them
//! out of function bodies), in the batch's transaction, so it always matches the roles the
//! batch left — on every node, since role statements are replicated writes.
//!
//! `raftpg.apply_roles(state, exact)` makes this node's roles match a recorded state: creates
//! and alters roles and grants memberships, and with `exact` also drops roles and revokes
//! memberships the state does not have. A snapshot install calls it (not exact) with the
//! archive's state before restoring it, so the dump's owners and grants exist; the applier
//! calls it (exact) whenever it connects, which after an install makes the roles exactly the
//! snapshot's. Both are idempotent: a crash anywhere is repaired by the next connection.

/// raftpg's own roles, never part of the recorded state.
pub const OWN_ROLES: &[&str] = &["raftpg", "raftpg_reader", "raftpg_admin"];

/// Creates `raftpg_admin` and the role-state functions (idempotent; run by the applier when it
/// connects).
pub const BOOTSTRAP_SQL: &str = r#"
    ALTER TABLE raftpg.applied ADD COLUMN IF NOT EXISTS roles jsonb;
    -- The role whose members administer the cluster (every node creates it the same way).
    DO $$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'raftpg_admin') THEN
            CREATE ROLE raftpg_admin NOLOGIN;
        END IF;
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.is_user_role(r name) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
        SELECT r NOT IN ('raftpg', 'raftpg_reader', 'raftpg_admin') AND left(r, 3) <> 'pg_'
    $$;
    CREATE OR REPLACE FUNCTION raftpg.role_state() RETURNS jsonb LANGUAGE sql STABLE AS $$
        SELECT jsonb_build_object(
            'roles', coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                    'name', a.rolname, 'inherit', a.rolinherit, 'createrole', a.rolcreaterole,
                    'createdb', a.rolcreatedb, 'login', a.rolcanlogin, 'bypassrls', a.rolbypassrls,
                    'connlimit', a.rolconnlimit, 'password', a.rolpassword,
                    'valid_until', to_char(a.rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
                    ORDER BY a.rolname)
                FROM pg_catalog.pg_authid a WHERE raftpg.is_user_role(a.rolname)), '[]'),
            'members', coalesce((
                SELECT jsonb_agg(jsonb_build_array(r.rolname, m.rolname, am.admin_option)
                    ORDER BY r.rolname, m.rolname)
                FROM pg_catalog.pg_auth_members am
                JOIN pg_catalog.pg_authid r ON r.oid = am.roleid
                JOIN pg_catalog.pg_authid m ON m.oid = am.member
                WHERE raftpg.is_user_role(m.rolname)
                  AND (raftpg.is_user_role(r.rolname) OR r.rolname = 'raftpg_admin')), '[]'))
    $$;
    CREATE OR REPLACE FUNCTION raftpg.apply_roles(state jsonb, exact boolean) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE r jsonb; m jsonb; x record;
    BEGIN
        IF state IS NULL THEN
            RETURN;
        END IF;
        FOR r IN SELECT * FROM jsonb_array_elements(state->'roles') LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_authid WHERE rolname = r->>'name') THEN
                EXECUTE format('CREATE ROLE %I', r->>'name');
            END IF;
            EXECUTE format('ALTER ROLE %I WITH %s %s %s %s %s CONNECTION LIMIT %s PASSWORD %s',
                r->>'name',
                CASE WHEN (r->>'inherit')::boolean THEN 'INHERIT' ELSE 'NOINHERIT' END,
                CASE WHEN (r->>'createrole')::boolean THEN 'CREATEROLE' ELSE 'NOCREATEROLE' END,
                CASE WHEN (r->>'createdb')::boolean THEN 'CREATEDB' ELSE 'NOCREATEDB' END,
                CASE WHEN (r->>'login')::boolean THEN 'LOGIN' ELSE 'NOLOGIN' END,
                CASE WHEN (r->>'bypassrls')::boolean THEN 'BYPASSRLS' ELSE 'NOBYPASSRLS' END,
                (r->>'connlimit')::int,
                coalesce(quote_literal(r->>'password'), 'NULL'));
            IF r->>'valid_until' IS NOT NULL THEN
                EXECUTE format('ALTER ROLE %I VALID UNTIL %L', r->>'name', r->>'valid_until');
            END IF;
        END LOOP;
        FOR m IN SELECT * FROM jsonb_array_elements(state->'members') LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members am
                           JOIN pg_catalog.pg_authid g ON g.oid = am.roleid
                           JOIN pg_catalog.pg_authid u ON u.oid = am.member
                           WHERE g.rolname = m->>0 AND u.rolname = m->>1
                             AND am.admin_option = (m->>2)::boolean) THEN
                EXECUTE format('GRANT %I TO %I%s', m->>0, m->>1,
                    CASE WHEN (m->>2)::boolean THEN ' WITH ADMIN OPTION' ELSE '' END);
            END IF;
        END LOOP;
        IF NOT exact THEN
            RETURN;
        END IF;
        FOR x IN SELECT g.rolname AS granted, u.rolname AS member, am.admin_option
                 FROM pg_catalog.pg_auth_members am
                 JOIN pg_catalog.pg_authid g ON g.oid = am.roleid
                 JOIN pg_catalog.pg_authid u ON u.oid = am.member
                 WHERE raftpg.is_user_role(u.rolname)
                   AND (raftpg.is_user_role(g.rolname) OR g.rolname = 'raftpg_admin')
                   AND NOT (state->'members') @> jsonb_build_array(
                           jsonb_build_array(g.rolname, u.rolname, am.admin_option)) LOOP
            EXECUTE format('REVOKE %I FROM %I', x.granted, x.member);
        END LOOP;
        FOR x IN SELECT a.rolname FROM pg_catalog.pg_authid a
                 WHERE raftpg.is_user_role(a.rolname)
                   AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(state->'roles') s
                                   WHERE s->>'name' = a.rolname) LOOP
            EXECUTE format('DROP ROLE %I', x.rolname);
        END LOOP;
    END $$;
    -- Every user role is granted to raftpg_reader, so that a read can run as it (SET LOCAL
    -- ROLE in the read's transaction). Called by record_roles and when the applier connects
    -- (APPLY_RECORDED_SQL: roles a snapshot install created).
    CREATE OR REPLACE FUNCTION raftpg.grant_roles_to_reader() RETURNS void LANGUAGE plpgsql AS $$
    DECLARE x record;
    BEGIN
        FOR x IN SELECT a.rolname FROM pg_catalog.pg_authid a
                 WHERE raftpg.is_user_role(a.rolname)
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                                   JOIN pg_catalog.pg_authid r ON r.oid = m.member
                                   WHERE m.roleid = a.oid AND r.rolname = 'raftpg_reader') LOOP
            EXECUTE format('GRANT %I TO raftpg_reader', x.rolname);
        END LOOP;
    END $$;
    -- The roles' state to record, after granting new roles to raftpg_reader. Called with every
    -- batch that ran DDL (applier::RECORD_APPLIED_ROLES_SQL).
    CREATE OR REPLACE FUNCTION raftpg.record_roles() RETURNS jsonb LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM raftpg.grant_roles_to_reader();
        RETURN raftpg.role_state();
    END $$;
"#;

/// What the roles may use of schema raftpg (and what raftpg_admin may do in the database), set
/// when the applier connects, after every raftpg function exists: a write running as a role calls the deterministic clock and random
/// functions the gate rewrote its SQL to, and its DDL fires raftpg's event triggers; nothing
/// else of raftpg is theirs (begin_entry, for one, could change the session authorization).
pub const PRIVILEGES_SQL: &str = r#"
    GRANT USAGE ON SCHEMA raftpg TO PUBLIC;
    REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA raftpg FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION raftpg.now(), raftpg."current_date"(), raftpg."current_time"(),
        raftpg."localtime"(), raftpg."localtimestamp"(), raftpg.random(),
        raftpg.gen_random_uuid(), raftpg.next_draw() TO PUBLIC;
    -- The event triggers fire for the roles' DDL and call raftpg's own functions.
    ALTER FUNCTION raftpg.on_ddl() SECURITY DEFINER;
    ALTER FUNCTION raftpg.on_drop() SECURITY DEFINER;
    -- Administrators may create schemas and (trusted) extensions, and objects in public, and
    -- pass that on. The same on every node, set again on every connection (a restored
    -- database is a new one).
    DO $$ BEGIN
        EXECUTE format('GRANT CREATE ON DATABASE %I TO raftpg_admin', current_database());
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'public') THEN
            GRANT USAGE, CREATE ON SCHEMA public TO raftpg_admin WITH GRANT OPTION;
        END IF;
    END $$;
"#;

/// Makes this node's roles exactly the ones its database recorded (after a snapshot install,
/// the snapshot's), each granted to raftpg_reader.
pub const APPLY_RECORDED_SQL: &str = "SELECT raftpg.apply_roles(roles, true) FROM raftpg.applied;
    SELECT raftpg.grant_roles_to_reader()";
