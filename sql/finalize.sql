-- immuta finalize: objects that depend on the functions.

-- Rows added to immuta's tables by a role rather than by immuta (a restore): see bootstrap.sql
-- and src/restore.rs.
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.data_keys
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.key_usage
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.audit_log
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.config
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.keyrings
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();

-- One row per data key, without the wrapped key bytes. `state` is what key_state.rs shows: active
-- (the newest enabled key of its keyring), decrypt-only, disabled or destroyed.
CREATE VIEW immuta.keys AS
SELECT k.id,
       k.created_at,
       k.provider,
       k.wrapping_key,
       k.wrapping_region,
       k.reason,
       k.created_by,
       k.id OPERATOR(pg_catalog.=) c.current_id AND k.state OPERATOR(pg_catalog.=) 'enabled' AS is_current,
       CASE WHEN k.id OPERATOR(pg_catalog.=) c.current_id AND k.state OPERATOR(pg_catalog.=) 'enabled'
            THEN k.created_at OPERATOR(pg_catalog.+) pg_catalog.make_interval(
                     secs => COALESCE(r.rollover_days, immuta.rollover_length_days())::pg_catalog.float8
                             OPERATOR(pg_catalog.*) 86400.0::pg_catalog.float8)
       END AS rollover_due_at,
       immuta.encryptions_counted(k.id) AS encryptions,
       CASE WHEN k.id OPERATOR(pg_catalog.=) c.current_id AND k.state OPERATOR(pg_catalog.=) 'enabled'
            THEN immuta.max_encryptions_per_key() END AS max_encryptions,
       k.server_identity,
       k.keyring,
       CASE WHEN k.state OPERATOR(pg_catalog.<>) 'enabled' THEN k.state
            WHEN k.id OPERATOR(pg_catalog.=) c.current_id THEN 'active'
            ELSE 'decrypt-only' END AS state,
       k.state_changed_at,
       k.state_changed_by
FROM immuta.data_keys k
CROSS JOIN LATERAL (SELECT pg_catalog.max(d.id) AS current_id FROM immuta.data_keys d
                    WHERE d.keyring OPERATOR(pg_catalog.=) k.keyring) c
LEFT JOIN immuta.keyrings r ON r.name OPERATOR(pg_catalog.=) k.keyring;
COMMENT ON VIEW immuta.keys IS 'immuta data keys: which encrypts now, when it rolls over, how much it was used';

-- Privileges (README, "Roles"). Nothing is executable by PUBLIC; each role gets what it is for.
-- The functions read and write immuta's tables with the tables' owner's privileges and a fixed
-- search_path, only for their own fixed queries (src/catalog.rs, `as_owner`), so no role
-- needs, or gets, any privilege on the tables themselves.
REVOKE ALL ON SCHEMA immuta FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA immuta FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA immuta FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta.rollover_length_days(), immuta.encryptions_counted(bigint),
    immuta.max_encryptions_per_key(), immuta.guard_direct_insert() FROM PUBLIC;

REVOKE EXECUTE ON FUNCTION immuta_encrypt(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_decrypt(bytea) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_key_id(bytea) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_rotate() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_rotate_if_due() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_rewrap() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_cache_reset(boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_cache_stats() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_configure(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_config() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_schedule_rotation(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_unschedule_rotation() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.immuta_rotation_job() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION immuta_encrypt(text) TO immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta_decrypt(bytea) TO immuta_decryptor;
-- Reading a value's key id (its header) reveals nothing secret; every immuta role may.
GRANT EXECUTE ON FUNCTION immuta_key_id(bytea) TO immuta_admin, immuta_encryptor, immuta_decryptor;
GRANT EXECUTE ON FUNCTION immuta_rotate(), immuta_rotate_if_due(), immuta_rewrap(), immuta_cache_reset(boolean),
    immuta_cache_stats(), immuta_configure(text), immuta_config(), immuta_schedule_rotation(text),
    immuta_unschedule_rotation(), immuta_status(), pg_catalog.immuta_rotation_job() TO immuta_admin;

-- The role that installed immuta may use it in this database and pass that on (GRANT OPTION):
-- privileges on functions are per database, unlike membership in the three roles.
GRANT EXECUTE ON FUNCTION immuta_encrypt(text), immuta_decrypt(bytea), immuta_key_id(bytea), immuta_rotate(),
    immuta_rotate_if_due(), immuta_rewrap(), immuta_cache_reset(boolean), immuta_cache_stats(), immuta_configure(text),
    immuta_config(), immuta_schedule_rotation(text), immuta_unschedule_rotation(), immuta_status(),
    pg_catalog.immuta_rotation_job()
    TO @extowner@ WITH GRANT OPTION;
GRANT SELECT ON immuta.keys, immuta.audit_log TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON FUNCTION immuta.rollover_length_days(), immuta.encryptions_counted(bigint),
    immuta.max_encryptions_per_key() TO @extowner@ WITH GRANT OPTION;

-- Typed values and contexts: encrypting for the encryptor, decrypting for the decryptor.
REVOKE EXECUTE ON FUNCTION immuta_encrypt(text, text), immuta_encrypt(anyelement), immuta_encrypt(anyelement, text),
    immuta_decrypt(bytea, text), immuta_decrypt(bytea, anyelement), immuta_decrypt(bytea, anyelement, text),
    immuta_decrypt_bytea(bytea), immuta_decrypt_bytea(bytea, text),
    immuta_decrypt_jsonb(bytea), immuta_decrypt_jsonb(bytea, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta_encrypt(text, text), immuta_encrypt(anyelement), immuta_encrypt(anyelement, text)
    TO immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta_decrypt(bytea, text), immuta_decrypt(bytea, anyelement),
    immuta_decrypt(bytea, anyelement, text), immuta_decrypt_bytea(bytea), immuta_decrypt_bytea(bytea, text),
    immuta_decrypt_jsonb(bytea), immuta_decrypt_jsonb(bytea, text)
    TO immuta_decryptor;
GRANT EXECUTE ON FUNCTION immuta_encrypt(text, text), immuta_encrypt(anyelement), immuta_encrypt(anyelement, text),
    immuta_decrypt(bytea, text), immuta_decrypt(bytea, anyelement), immuta_decrypt(bytea, anyelement, text),
    immuta_decrypt_bytea(bytea), immuta_decrypt_bytea(bytea, text),
    immuta_decrypt_jsonb(bytea), immuta_decrypt_jsonb(bytea, text)
    TO @extowner@ WITH GRANT OPTION;

-- The admin reads the keys (without key bytes) and the audit log.
GRANT USAGE ON SCHEMA immuta TO immuta_admin;
GRANT SELECT ON immuta.keys, immuta.audit_log TO immuta_admin;
GRANT SELECT ON immuta.keyrings TO immuta_admin;
GRANT EXECUTE ON FUNCTION immuta.rollover_length_days(), immuta.encryptions_counted(bigint),
    immuta.max_encryptions_per_key() TO immuta_admin;

-- Keyrings and key states (issue 14): encrypting under a keyring for the encryptor; creating,
-- configuring and destroying keyrings, and disabling, enabling and destroying keys, for the admin.
REVOKE EXECUTE ON FUNCTION immuta_encrypt(anyelement, @extschema@.immuta_keyring), immuta_encrypt(anyelement, text, @extschema@.immuta_keyring),
    immuta_encrypt(text, @extschema@.immuta_keyring), immuta_encrypt(text, text, @extschema@.immuta_keyring),
    immuta_rotate(text), immuta_status(text),
    immuta_keyring_create(text, integer, text, text), immuta_keyring_configure(text, integer, text, text),
    immuta_keyring_destroy(text, text), immuta_key_disable(bigint, text), immuta_key_enable(bigint, text),
    immuta_key_destroy(bigint, text, boolean), immuta_disable_keys_before(text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta_encrypt(anyelement, @extschema@.immuta_keyring), immuta_encrypt(anyelement, text, @extschema@.immuta_keyring),
    immuta_encrypt(text, @extschema@.immuta_keyring), immuta_encrypt(text, text, @extschema@.immuta_keyring)
    TO immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta_rotate(text), immuta_status(text),
    immuta_keyring_create(text, integer, text, text), immuta_keyring_configure(text, integer, text, text),
    immuta_keyring_destroy(text, text), immuta_key_disable(bigint, text), immuta_key_enable(bigint, text),
    immuta_key_destroy(bigint, text, boolean), immuta_disable_keys_before(text, bigint, text) TO immuta_admin;
GRANT EXECUTE ON FUNCTION immuta_encrypt(anyelement, @extschema@.immuta_keyring), immuta_encrypt(anyelement, text, @extschema@.immuta_keyring),
    immuta_encrypt(text, @extschema@.immuta_keyring), immuta_encrypt(text, text, @extschema@.immuta_keyring),
    immuta_rotate(text), immuta_status(text),
    immuta_keyring_create(text, integer, text, text), immuta_keyring_configure(text, integer, text, text),
    immuta_keyring_destroy(text, text), immuta_key_disable(bigint, text), immuta_key_enable(bigint, text),
    immuta_key_destroy(bigint, text, boolean), immuta_disable_keys_before(text, bigint, text)
    TO @extowner@ WITH GRANT OPTION;
GRANT SELECT ON immuta.keyrings TO @extowner@ WITH GRANT OPTION;

-- Data under old keys (issue 15). Re-encrypting opens a value without returning it: the
-- decryptor's; the inventory reads the keys table: the admin's (with SELECT on the table, since
-- it runs as its caller).
CREATE FUNCTION immuta_inventory(tbl regclass, col name)
RETURNS TABLE (key_id bigint, keyring text, state text, is_current boolean, value_count bigint)
LANGUAGE plpgsql STABLE SECURITY INVOKER PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  typ oid;
BEGIN
  SELECT a.atttypid INTO typ FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = '42703', MESSAGE = pg_catalog.format('column %I of %s does not exist', col, tbl);
  END IF;
  IF typ <> 'pg_catalog.bytea'::pg_catalog.regtype THEN
    RAISE EXCEPTION USING ERRCODE = '42804', MESSAGE = pg_catalog.format('column %I of %s is not of type bytea', col, tbl),
      HINT = 'immuta stores encrypted values in bytea columns.';
  END IF;
  -- The header is in the first bytes: a prefix is all that is read of a value stored out of line.
  RETURN QUERY EXECUTE pg_catalog.format(
    'SELECT v.k, k.keyring, k.state, k.is_current, v.n
       FROM (SELECT @extschema@.immuta_key_id(pg_catalog.substr(%1$I, 1, 64)) AS k, pg_catalog.count(*) AS n
               FROM %2$s WHERE %1$I IS NOT NULL GROUP BY 1) v
       LEFT JOIN immuta.keys k ON k.id OPERATOR(pg_catalog.=) v.k
      ORDER BY v.k', col, tbl);
END
$body$;
REVOKE EXECUTE ON FUNCTION immuta_reencrypt(bytea), immuta_reencrypt(bytea, text), immuta_inventory(regclass, name)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta_reencrypt(bytea), immuta_reencrypt(bytea, text) TO immuta_decryptor;
GRANT EXECUTE ON FUNCTION immuta_inventory(regclass, name) TO immuta_admin;
GRANT EXECUTE ON FUNCTION immuta_reencrypt(bytea), immuta_reencrypt(bytea, text), immuta_inventory(regclass, name)
    TO @extowner@ WITH GRANT OPTION;
-- Online jobs on a column (issue 15): re-encrypting a column, or filling an encrypted column from
-- a plaintext one, in batches run by a procedure that commits after each; the job's row says
-- where to resume. Each role sees and writes only its own jobs (row-level security), and only the
-- columns that record progress; the procedures run as their caller, with the caller's privileges
-- on the table. Every operator below is pg_catalog's, named or reached by exact types: nothing a
-- schema owner plants is resolved.
CREATE TABLE immuta.jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('reencrypt', 'encrypt', 'blind_index')),
    relid oid NOT NULL,
    column_name name NOT NULL,
    source_column name,
    context_column name,
    keyring text,
    before_key bigint,
    batch_size integer NOT NULL CHECK (batch_size BETWEEN 1 AND 1000000),
    pause interval NOT NULL,
    started_by name NOT NULL DEFAULT current_user,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_batch_at timestamptz,
    finished_at timestamptz,
    passes integer NOT NULL DEFAULT 1 CHECK (passes >= 1),
    next_block bigint NOT NULL DEFAULT 0 CHECK (next_block >= 0),
    rows_done bigint NOT NULL DEFAULT 0 CHECK (rows_done >= 0),
    rows_total bigint NOT NULL DEFAULT 0 CHECK (rows_total >= 0),
    -- A blind index job that finished: the rows whose term it could not compute (their value
    -- under a disabled or destroyed key, of a keyring without the index, or not immuta's).
    rows_skipped bigint NOT NULL DEFAULT 0 CHECK (rows_skipped >= 0),
    -- A blind index job: the index whose terms it computes into column_name from source_column.
    index_name text,
    CHECK ((kind IN ('encrypt', 'blind_index')) = (source_column IS NOT NULL)),
    CHECK ((kind = 'blind_index') = (index_name IS NOT NULL))
);
ALTER TABLE immuta.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_jobs ON immuta.jobs USING (started_by OPERATOR(pg_catalog.=) current_user)
    WITH CHECK (started_by OPERATOR(pg_catalog.=) current_user);
-- The columns that hold immuta's values: a destroy of a key that any of them still holds is
-- refused unless forced (immuta_key_destroy), and immuta_key_references counts them. A job
-- registers its column; roles that may update a column register and unregister it.
CREATE TABLE immuta.encrypted_columns (
    relid oid NOT NULL,
    column_name name NOT NULL,
    context_column name,
    registered_by name NOT NULL DEFAULT current_user,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relid, column_name)
);
ALTER TABLE immuta.encrypted_columns ENABLE ROW LEVEL SECURITY;
CREATE POLICY everyone_reads ON immuta.encrypted_columns FOR SELECT USING (true);
CREATE POLICY column_updaters_register ON immuta.encrypted_columns FOR INSERT
    WITH CHECK (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE')
                AND registered_by OPERATOR(pg_catalog.=) current_user);
CREATE POLICY column_updaters_reregister ON immuta.encrypted_columns FOR UPDATE
    USING (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE'))
    WITH CHECK (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE')
                AND registered_by OPERATOR(pg_catalog.=) current_user);
-- The admin unregisters any column: nobody can keep key destruction refused for good.
CREATE POLICY column_updaters_and_admins_unregister ON immuta.encrypted_columns FOR DELETE
    USING (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE')
           OR pg_catalog.pg_has_role('immuta_admin', 'MEMBER'));
CREATE VIEW immuta.jobs_progress WITH (security_barrier) AS
SELECT j.id, j.kind, j.relid::pg_catalog.regclass AS table_name, j.column_name, j.started_by, j.started_at,
       j.last_batch_at, j.finished_at, j.passes, j.rows_done,
       CASE WHEN j.finished_at IS NOT NULL THEN 0::pg_catalog.int8
            ELSE GREATEST(j.rows_total OPERATOR(pg_catalog.-) j.rows_done, 0::pg_catalog.int8) END AS rows_left,
       CASE WHEN j.last_batch_at OPERATOR(pg_catalog.>) j.started_at
            THEN pg_catalog.round(j.rows_done::pg_catalog.float8 OPERATOR(pg_catalog./)
                                  pg_catalog.date_part('epoch', j.last_batch_at OPERATOR(pg_catalog.-) j.started_at))
       END AS rows_per_second,
       CASE WHEN j.finished_at IS NOT NULL THEN 'done'
            WHEN EXISTS (SELECT FROM pg_catalog.pg_locks l
                          WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted
                            AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                                 WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
                            AND l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2
                            AND ((l.classid::pg_catalog.int8 OPERATOR(pg_catalog.<<) 32) OPERATOR(pg_catalog.|) l.objid::pg_catalog.int8)
                                OPERATOR(pg_catalog.=) (j.id OPERATOR(pg_catalog.+) 5282439408914153472::pg_catalog.int8)
                            -- A session whose call was cancelled still holds the lock, idle.
                            AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                                             WHERE a.pid OPERATOR(pg_catalog.=) l.pid
                                               AND a.state OPERATOR(pg_catalog.~~) 'idle%'))
            THEN 'running'
            ELSE 'interrupted'
       END AS state,
       j.source_column, j.rows_skipped
  FROM immuta.jobs j
 WHERE j.started_by OPERATOR(pg_catalog.=) current_user OR pg_catalog.pg_has_role('immuta_admin', 'MEMBER');

-- A context column's value as text, through its type's output function: a cast could be a
-- function of the table owner's, run as whoever runs the job. `prefix` names the row: '' for a
-- table's own columns, '($1).' for a trigger's NEW.
CREATE FUNCTION immuta.context_expression(context_column name, prefix text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $body$
SELECT pg_catalog.format('CASE WHEN %1$s%2$I IS NULL THEN NULL::pg_catalog.text ELSE pg_catalog.format(%3$L, %1$s%2$I) END',
                         prefix, context_column, '%s')
$body$;

-- The expression that encrypts column `source` (with `context_column` as the context, under
-- `keyring`) of the row `prefix` names, through immuta.encrypt_value: a function of immuta's own
-- schema, where nobody plants an overload.
CREATE FUNCTION immuta.encrypt_expression(source name, context_column name, keyring text, prefix text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $body$
SELECT pg_catalog.format('immuta.encrypt_value(%s%I, %s, %s, %L::pg_catalog.text)', prefix, source,
         CASE WHEN context_column IS NULL THEN 'false' ELSE 'true' END,
         CASE WHEN context_column IS NULL THEN 'NULL::pg_catalog.text'
              ELSE immuta.context_expression(context_column, prefix) END,
         keyring)
$body$;

-- What every job checks of its table before it records anything: a plain table whose rows the
-- caller all sees.
CREATE FUNCTION immuta.check_job_table(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
  IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl::oid) <> 'r'::"char" THEN
    RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = pg_catalog.format('%s is not a table', tbl),
      HINT = 'Run it on each partition (or child table) on its own.';
  END IF;
  IF pg_catalog.row_security_active(tbl::oid) THEN
    RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = pg_catalog.format('row-level security hides rows of %s from this role', tbl),
      DETAIL = 'A job must reach every row, or it could report done with values it never saw.',
      HINT = 'Run it as a role that bypasses the table''s row-level security (its owner, or a role with BYPASSRLS).';
  END IF;
END
$body$;

-- The type of column `col` of `tbl`; 42703 when it does not exist.
CREATE FUNCTION immuta.column_type(tbl regclass, col name) RETURNS oid
LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  typ oid;
BEGIN
  SELECT a.atttypid INTO typ FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = tbl::oid AND a.attname = col AND a.attnum > 0::int2 AND NOT a.attisdropped;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = '42703', MESSAGE = pg_catalog.format('column %I of %s does not exist', col, tbl);
  END IF;
  RETURN typ;
END
$body$;

-- Registers column `col` of `tbl` (bytea, holding immuta's values) for immuta_key_references and
-- the destroy check; its writers (UPDATE on the column) and the admin may.
CREATE FUNCTION immuta_register_column(tbl regclass, col name, context_column name DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
  IF tbl IS NULL OR col IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'immuta_register_column needs a table and a column';
  END IF;
  IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl::oid) <> 'r'::"char" THEN
    RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = pg_catalog.format('%s is not a table', tbl),
      HINT = 'Register the column of each partition (or child table).';
  END IF;
  IF (SELECT c.relpersistence FROM pg_catalog.pg_class c WHERE c.oid = tbl::oid) = 't'::"char" THEN
    RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = pg_catalog.format('%s is a temporary table', tbl),
      DETAIL = 'Other sessions cannot read it: nobody could count its values.';
  END IF;
  IF immuta.column_type(tbl, col) <> 'pg_catalog.bytea'::pg_catalog.regtype::oid THEN
    RAISE EXCEPTION USING ERRCODE = '42804', MESSAGE = pg_catalog.format('column %I of %s is not of type bytea', col, tbl),
      HINT = 'immuta stores encrypted values in bytea columns.';
  END IF;
  IF context_column IS NOT NULL THEN
    PERFORM immuta.column_type(tbl, context_column);
  END IF;
  IF NOT pg_catalog.has_column_privilege(tbl::oid, col, 'UPDATE') THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format('permission denied for table %s', tbl),
      HINT = 'Registering a column takes UPDATE on it.';
  END IF;
  INSERT INTO immuta.encrypted_columns AS e (relid, column_name, context_column)
  VALUES (tbl::oid, col, immuta_register_column.context_column)
  ON CONFLICT (relid, column_name) DO UPDATE SET context_column = EXCLUDED.context_column,
         registered_by = current_user, registered_at = pg_catalog.now();
END
$body$;

CREATE FUNCTION immuta_unregister_column(tbl regclass, col name) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  encrypted boolean;
BEGIN
  DELETE FROM immuta.encrypted_columns e WHERE e.relid = tbl::oid AND e.column_name = col;
  encrypted := FOUND;
  -- A term column (immuta_blind_index_column) is unregistered the same way.
  DELETE FROM immuta.blind_index_columns b WHERE b.relid = tbl::oid AND b.column_name = col;
  RETURN encrypted OR FOUND;
END
$body$;

-- Values under key `key_id` in each registered column that still exists, counted as the caller
-- from each value's header (immuta_key_destroy calls it before it destroys a key).
CREATE FUNCTION immuta.key_references(key_id bigint)
RETURNS TABLE (table_name regclass, column_name name, value_count bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT e.relid, e.column_name FROM immuta.encrypted_columns e
             JOIN pg_catalog.pg_class c ON c.oid = e.relid AND c.relkind = 'r'::"char" AND c.relpersistence <> 't'::"char"
             JOIN pg_catalog.pg_attribute a ON a.attrelid = e.relid AND a.attname = e.column_name
                  AND a.attnum > 0::int2 AND NOT a.attisdropped
            ORDER BY c.relname, e.relid, e.column_name LOOP
    -- Locked first, then checked: what the checks see (a plain table, its column a stored bytea,
    -- no row-level security for this role) cannot change before the count has read it. NOWAIT:
    -- a session that holds a conflicting lock makes this fail, not wait.
    BEGIN
      EXECUTE pg_catalog.format('LOCK TABLE ONLY %s IN ACCESS SHARE MODE NOWAIT', r.relid::regclass);
    EXCEPTION WHEN lock_not_available THEN
      RAISE EXCEPTION USING ERRCODE = '55P03',
        MESSAGE = pg_catalog.format('could not lock %s to count its values', r.relid::regclass),
        HINT = 'Another session holds a lock on it that keeps readers out; try again.';
    END;
    CONTINUE WHEN NOT EXISTS (
      SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
       WHERE c.oid = r.relid AND c.relkind = 'r'::"char" AND a.attname = r.column_name AND a.attnum > 0::int2
         AND NOT a.attisdropped AND a.attgenerated = ''::"char"
         AND a.atttypid = 'pg_catalog.bytea'::pg_catalog.regtype::oid);
    IF NOT pg_catalog.has_column_privilege(r.relid, r.column_name, 'SELECT') THEN
      RAISE EXCEPTION USING ERRCODE = '42501',
        MESSAGE = pg_catalog.format('permission denied to count the values of column %I of %s', r.column_name, r.relid::regclass),
        DETAIL = 'The column is registered as holding immuta''s values; counting them takes SELECT on it.',
        HINT = 'Grant SELECT on the column, or unregister it (immuta_unregister_column) if it no longer holds immuta''s values.';
    END IF;
    IF pg_catalog.row_security_active(r.relid) THEN
      RAISE EXCEPTION USING ERRCODE = '0A000',
        MESSAGE = pg_catalog.format('row-level security hides rows of %s from this role', r.relid::regclass),
        DETAIL = 'A count of the values under a key must see every row.',
        HINT = 'Count as a role that bypasses the table''s row-level security (its owner, or a role with BYPASSRLS).';
    END IF;
    table_name := r.relid::regclass;
    column_name := r.column_name;
    EXECUTE pg_catalog.format(
      'SELECT pg_catalog.count(*) FROM ONLY %s WHERE @extschema@.immuta_key_id(pg_catalog.substr(%I, 1, 64)) OPERATOR(pg_catalog.=) $1::pg_catalog.int8',
      r.relid::regclass, r.column_name) INTO value_count USING key_id;
    RETURN NEXT;
  END LOOP;
END
$body$;
CREATE FUNCTION immuta_key_references(key_id bigint)
RETURNS TABLE (table_name regclass, column_name name, value_count bigint)
LANGUAGE sql STABLE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
SELECT r.table_name, r.column_name, r.value_count FROM immuta.key_references(key_id) r
$body$;

-- One job, from its row: batches over block ranges, each its own transaction, passes until no
-- row is left to do. Called by immuta_reencrypt_column and immuta_encrypt_column.
CREATE PROCEDURE immuta.run_job(job_id bigint)
LANGUAGE plpgsql SECURITY INVOKER AS $body$
DECLARE
  -- Types named with their schema: a procedure that commits cannot carry SET search_path, and
  -- its declarations are resolved before its first statement runs.
  job immuta.jobs;
  tbl pg_catalog.regclass;
  block_size pg_catalog.int8;
  per_block pg_catalog.int8;
  step pg_catalog.int8;
  nblocks pg_catalog.int8;
  done pg_catalog.int8;
  remaining pg_catalog.int8;
  filter pg_catalog.text;
  new_value pg_catalog.text;
  trigger_name pg_catalog.name;
  saved_level pg_catalog.text;
  skipped pg_catalog.int8 := 0;
  unreadable pg_catalog.text;
  -- The job's advisory lock: one bigint, 'IMJB' above the job id.
  lock_base constant pg_catalog.int8 := 5282439408914153472;
BEGIN
  -- This procedure commits, so it cannot carry SET search_path: each of its transactions sets
  -- it, before anything is planned, to pg_catalog and the caller's own temporary schema.
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  SELECT * INTO job FROM immuta.jobs j WHERE j.id = job_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = pg_catalog.format('immuta job %s does not exist', job_id),
      HINT = 'A role runs only its own jobs (immuta.jobs_progress).';
  END IF;
  tbl := job.relid::regclass;
  PERFORM immuta.check_job_table(tbl);
  IF NOT pg_catalog.pg_try_advisory_lock(lock_base + job.id) THEN
    RAISE EXCEPTION USING ERRCODE = '55006', MESSAGE = pg_catalog.format('immuta job %s is running in another session', job.id),
      HINT = 'Wait for it (immuta.jobs_progress), or end that session; the job resumes where it stopped.';
  END IF;
  IF job.kind = 'reencrypt' THEN
    -- Values to move: under a key that is not its keyring's current one (and, with before_key,
    -- older than that key).
    filter := pg_catalog.format('%I IS NOT NULL AND NOT @extschema@.immuta_is_current(%I)', job.column_name, job.column_name);
    IF job.before_key IS NOT NULL THEN
      filter := filter || pg_catalog.format(' AND @extschema@.immuta_key_id(%I) < %s::pg_catalog.int8', job.column_name, job.before_key);
    END IF;
    new_value := CASE WHEN job.context_column IS NULL THEN pg_catalog.format('@extschema@.immuta_reencrypt(%I)', job.column_name)
                      ELSE pg_catalog.format('@extschema@.immuta_reencrypt(%I, %s)', job.column_name,
                                             immuta.context_expression(job.context_column, '')) END;
  ELSIF job.kind = 'blind_index' THEN
    -- Rows whose term is missing, left over, or not made by the index's newest key (the trigger
    -- covers rows written since the job began). A value whose term cannot be computed (pending
    -- is NULL: under a disabled or destroyed key, of a keyring without the index, not immuta's)
    -- is left as it is and counted at the end, instead of stopping the job at that row.
    filter := pg_catalog.format(
      '((%1$I IS NULL AND %2$I IS NOT NULL) OR (%1$I IS NOT NULL AND immuta.blind_index_pending(%2$I, %1$I, %3$L::pg_catalog.text, %4$L::pg_catalog.text)))',
      job.source_column, job.column_name, job.index_name, job.keyring);
    unreadable := pg_catalog.format(
      '%1$I IS NOT NULL AND immuta.blind_index_pending(%2$I, %1$I, %3$L::pg_catalog.text, %4$L::pg_catalog.text) IS NULL',
      job.source_column, job.column_name, job.index_name, job.keyring);
    new_value := immuta.blind_index_expression(job.source_column, job.context_column, job.index_name, job.keyring, '');
  ELSE
    -- Rows whose plaintext has no encrypted value yet (the trigger covers rows written since the
    -- job began).
    filter := pg_catalog.format('%I IS NULL AND %I IS NOT NULL', job.column_name, job.source_column);
    new_value := immuta.encrypt_expression(job.source_column, job.context_column, job.keyring, '');
  END IF;
  -- Blocks per batch, and the rows of a first pass, from the table's statistics (every row
  -- may hold a value to move; the pass's count says how many really did).
  SELECT GREATEST(1, CASE WHEN c.relpages > 0 THEN (c.reltuples::float8 / c.relpages::float8)::bigint ELSE 100 END),
         GREATEST(c.reltuples, 0::float4)::bigint
    INTO per_block, remaining FROM pg_catalog.pg_class c WHERE c.oid = tbl::oid;
  IF job.rows_total = 0 THEN
    UPDATE immuta.jobs j SET rows_total = remaining WHERE j.id = job.id;
  END IF;
  COMMIT;
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  block_size := pg_catalog.current_setting('block_size')::bigint;
  step := GREATEST(1, job.batch_size::bigint / per_block);
  -- A pass covers the blocks the table had when it started: the versions its own updates add
  -- after them hold current values, and anything else the count at its end finds.
  nblocks := pg_catalog.pg_relation_size(tbl) / block_size;
  LOOP
    IF job.next_block >= nblocks THEN
      -- End of a pass: rows updated behind the cursor by copying an old value are found here.
      EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM ONLY %s WHERE %s', tbl, filter) INTO remaining;
      IF remaining = 0 THEN
        IF unreadable IS NOT NULL THEN
          EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM ONLY %s WHERE %s', tbl, unreadable) INTO skipped;
        END IF;
        UPDATE immuta.jobs j SET finished_at = pg_catalog.clock_timestamp(), rows_skipped = skipped WHERE j.id = job.id;
        COMMIT;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        -- Taken again by each resumption in the same session: released as often (the last,
        -- refused, release would warn).
        saved_level := pg_catalog.current_setting('client_min_messages');
        PERFORM pg_catalog.set_config('client_min_messages', 'error', true);
        WHILE pg_catalog.pg_advisory_unlock(lock_base + job.id) LOOP
        END LOOP;
        PERFORM pg_catalog.set_config('client_min_messages', saved_level, true);
        IF skipped > 0 THEN
          RAISE WARNING USING
            MESSAGE = pg_catalog.format('%s values of column %I of %s have no current term in column %I', skipped, job.source_column, tbl, job.column_name),
            DETAIL = pg_catalog.format('Their terms cannot be computed: each is under a disabled or destroyed key, of a keyring that has no index %L, or not an immuta value. They keep the term they had, or none; a lookup does not find them by their current term.', job.index_name),
            HINT = pg_catalog.format('List them with SELECT ctid FROM %s WHERE %s; once their key is enabled again or the index is created in their keyring, call immuta_blind_index_column again.', tbl, unreadable);
        END IF;
        IF job.kind = 'encrypt' THEN
          trigger_name := immuta.encrypt_trigger_name(job.column_name);
          RAISE NOTICE USING
            MESSAGE = pg_catalog.format('every value of column %I of %s is now also encrypted in column %I', job.source_column, tbl, job.column_name),
            DETAIL = pg_catalog.format('The trigger %I encrypts new and changed values of %I into %I until it is dropped. The plaintext is still in %I, in old row versions, in the WAL and in backups.',
                                       trigger_name, job.source_column, job.column_name, job.source_column),
            HINT = pg_catalog.format('Once the application reads and writes only %I: DROP TRIGGER %I ON %s; ALTER TABLE %s DROP COLUMN %I; then VACUUM FULL %s (or pg_repack) to rewrite the table without the old row versions. WAL archives and backups keep the plaintext until they age out.',
                                     job.column_name, trigger_name, tbl, tbl, job.source_column, tbl);
        END IF;
        RETURN;
      END IF;
      IF job.passes >= 2 AND remaining >= job.rows_total - job.rows_done THEN
        -- A whole pass moved none of them: something keeps them (a trigger, a rule, a policy).
        RAISE EXCEPTION USING ERRCODE = '55000',
          MESSAGE = pg_catalog.format('immuta job %s moved no value in its last pass; %s rows are still to do', job.id, remaining),
          HINT = 'Check the table''s triggers and rules for UPDATE: something prevents the new values from being stored.';
      END IF;
      UPDATE immuta.jobs j SET next_block = 0, passes = j.passes + 1, rows_total = j.rows_done + remaining
       WHERE j.id = job.id RETURNING * INTO job;
      COMMIT;
      PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
      nblocks := pg_catalog.pg_relation_size(tbl) / block_size;
      CONTINUE;
    END IF;
    -- One batch: the rows of a range of blocks still to do, each written from its latest version
    -- under its row lock (a row updated meanwhile is read again).
    EXECUTE pg_catalog.format(
      'UPDATE ONLY %s SET %I = %s WHERE ctid >= %L::pg_catalog.tid AND ctid < %L::pg_catalog.tid AND %s',
      tbl, job.column_name, new_value, pg_catalog.format('(%s,0)', job.next_block),
      pg_catalog.format('(%s,0)', job.next_block + step), filter);
    GET DIAGNOSTICS done = ROW_COUNT;
    UPDATE immuta.jobs j SET next_block = job.next_block + step, rows_done = j.rows_done + done,
           last_batch_at = pg_catalog.clock_timestamp()
     WHERE j.id = job.id RETURNING * INTO job;
    COMMIT;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF job.pause > '0'::interval THEN
      PERFORM pg_catalog.pg_sleep_for(job.pause);
    END IF;
  END LOOP;
END
$body$;

-- Checks every option of a job; 22023 when one is out of range.
CREATE FUNCTION immuta.check_job_options(batch_size integer, pause interval, before_key bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
  IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 1000000 OR pause IS NULL
     OR pause < '0'::interval OR pause > '1 hour'::interval OR before_key < 1 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'invalid batch size, pause or key',
      DETAIL = 'The batch size is 1 to 1,000,000 rows; the pause is 0 to 1 hour; a key id is positive.';
  END IF;
END
$body$;

-- The caller's unfinished job of this kind on the column, resumed with the options of this call;
-- else a new one. Its id.
CREATE FUNCTION immuta.resume_or_start_job(kind text, tbl regclass, col name, source name, context_column name,
                                           keyring text, before_key bigint, batch_size integer, pause interval,
                                           index_name text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  job_id bigint;
BEGIN
  UPDATE immuta.jobs j SET source_column = resume_or_start_job.source, context_column = resume_or_start_job.context_column,
         keyring = resume_or_start_job.keyring, before_key = resume_or_start_job.before_key,
         batch_size = resume_or_start_job.batch_size, pause = resume_or_start_job.pause,
         index_name = resume_or_start_job.index_name
   WHERE j.kind = resume_or_start_job.kind AND j.relid = tbl::oid AND j.column_name = col AND j.finished_at IS NULL
     AND j.started_by = current_user
  RETURNING j.id INTO job_id;
  IF NOT FOUND THEN
    INSERT INTO immuta.jobs (kind, relid, column_name, source_column, context_column, keyring, before_key, batch_size, pause,
                             index_name)
    VALUES (kind, tbl::oid, col, source, context_column, keyring, before_key, batch_size, pause, index_name)
    RETURNING id INTO job_id;
  END IF;
  RETURN job_id;
END
$body$;

CREATE FUNCTION immuta.encrypt_trigger_name(target name) RETURNS name
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $body$
SELECT pg_catalog.left('immuta_encrypt_' || target, 63)::pg_catalog.name
$body$;

CREATE PROCEDURE immuta_reencrypt_column(tbl regclass, col name, context_column name DEFAULT NULL,
                                         batch_size integer DEFAULT 1000, pause interval DEFAULT '0',
                                         before_key bigint DEFAULT NULL)
LANGUAGE plpgsql SECURITY INVOKER AS $body$
DECLARE
  job_id pg_catalog.int8;
BEGIN
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  IF tbl IS NULL OR col IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'immuta_reencrypt_column needs a table and a column';
  END IF;
  PERFORM immuta.check_job_options(batch_size, pause, before_key);
  PERFORM immuta.check_job_table(tbl);
  IF immuta.column_type(tbl, col) <> 'pg_catalog.bytea'::pg_catalog.regtype::oid THEN
    RAISE EXCEPTION USING ERRCODE = '42804', MESSAGE = pg_catalog.format('column %I of %s is not of type bytea', col, tbl);
  END IF;
  IF context_column IS NOT NULL THEN
    PERFORM immuta.column_type(tbl, context_column);
  END IF;
  -- Refused before any job is recorded: the job runs with its caller's privileges, never more.
  IF NOT (pg_catalog.has_column_privilege(tbl::oid, col, 'SELECT') AND pg_catalog.has_column_privilege(tbl::oid, col, 'UPDATE')
          AND (context_column IS NULL OR pg_catalog.has_column_privilege(tbl::oid, context_column, 'SELECT'))) THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format('permission denied for table %s', tbl),
      DETAIL = 'Re-encrypting a column reads and updates it as the caller.',
      HINT = 'The caller needs SELECT and UPDATE on the column (and SELECT on the context column).';
  END IF;
  job_id := immuta.resume_or_start_job('reencrypt', tbl, col, NULL, context_column, NULL, before_key, batch_size, pause);
  PERFORM @extschema@.immuta_register_column(tbl, col, context_column);
  CALL immuta.run_job(job_id);
END
$body$;

CREATE PROCEDURE immuta_encrypt_column(tbl regclass, source name, target name, context_column name DEFAULT NULL,
                                       keyring text DEFAULT NULL, batch_size integer DEFAULT 1000,
                                       pause interval DEFAULT '0')
LANGUAGE plpgsql SECURITY INVOKER AS $body$
DECLARE
  job_id pg_catalog.int8;
  trigger_name pg_catalog.name;
  trigger_args pg_catalog.text[];
  existing record;
  columns pg_catalog.text;
  later pg_catalog.text;
BEGIN
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  IF tbl IS NULL OR source IS NULL OR target IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'immuta_encrypt_column needs a table, a source column and a target column';
  END IF;
  PERFORM immuta.check_job_options(batch_size, pause, NULL);
  PERFORM immuta.check_job_table(tbl);
  IF source = target OR source = context_column OR target = context_column THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'the source, target and context columns must be three different columns';
  END IF;
  -- Refused here, before a trigger could make the application's writes fail.
  PERFORM immuta.check_encryptable(immuta.column_type(tbl, source)::pg_catalog.regtype);
  IF immuta.column_type(tbl, target) <> 'pg_catalog.bytea'::pg_catalog.regtype::oid THEN
    RAISE EXCEPTION USING ERRCODE = '42804', MESSAGE = pg_catalog.format('column %I of %s is not of type bytea', target, tbl),
      HINT = pg_catalog.format('Add it first: ALTER TABLE %s ADD COLUMN %I bytea (no rewrite, no long lock).', tbl, target);
  END IF;
  IF context_column IS NOT NULL THEN
    PERFORM immuta.column_type(tbl, context_column);
  END IF;
  IF NOT (pg_catalog.has_column_privilege(tbl::oid, source, 'SELECT') AND pg_catalog.has_column_privilege(tbl::oid, target, 'SELECT')
          AND pg_catalog.has_column_privilege(tbl::oid, target, 'UPDATE') AND pg_catalog.has_table_privilege(tbl::oid, 'TRIGGER')
          AND (context_column IS NULL OR pg_catalog.has_column_privilege(tbl::oid, context_column, 'SELECT'))) THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format('permission denied for table %s', tbl),
      DETAIL = 'Encrypting a column reads the plaintext and writes the encrypted column as the caller, and installs a trigger for the writes that arrive meanwhile.',
      HINT = 'The caller needs SELECT on the source (and context) column, SELECT and UPDATE on the target column, and TRIGGER on the table.';
  END IF;
  -- The keyring exists and the caller may encrypt under it (one throwaway encryption).
  EXECUTE 'SELECT ' || immuta.encrypt_expression('v', NULL, keyring, '') || ' FROM (VALUES (''''::pg_catalog.text)) x(v)';
  -- Writes from now on encrypt as they go: the trigger is in place (committed) before the first
  -- batch reads a row. Creating it waits for the writes in progress and makes new ones wait for it.
  trigger_name := immuta.encrypt_trigger_name(target);
  trigger_args := ARRAY[source::pg_catalog.text, target::pg_catalog.text, COALESCE(context_column, ''), COALESCE(keyring, '')];
  SELECT t.tgfoid, t.tgenabled, t.tgnargs, t.tgargs INTO existing FROM pg_catalog.pg_trigger t
   WHERE t.tgrelid = tbl::oid AND t.tgname = trigger_name;
  IF NOT FOUND THEN
    columns := pg_catalog.format('%I', source) ||
               CASE WHEN context_column IS NULL THEN '' ELSE pg_catalog.format(', %I', context_column) END;
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %s ON %s FOR EACH ROW EXECUTE FUNCTION immuta.encrypt_column_trigger(%L, %L, %L, %L)',
      trigger_name, columns, tbl, trigger_args[1], trigger_args[2], trigger_args[3], trigger_args[4]);
  ELSIF existing.tgfoid <> 'immuta.encrypt_column_trigger()'::pg_catalog.regprocedure::oid
        OR existing.tgenabled <> 'O'::"char" OR existing.tgnargs <> 4::int2
        OR existing.tgargs <> (SELECT pg_catalog.string_agg(pg_catalog.textsend(x.a) || '\x00'::pg_catalog.bytea, ''::pg_catalog.bytea ORDER BY x.n)
                                 FROM pg_catalog.unnest(trigger_args) WITH ORDINALITY AS x(a, n))
  THEN
    -- Resumed with other columns or keyring, or a trigger of the same name: its writes would
    -- not be this job's.
    RAISE EXCEPTION USING ERRCODE = '55000',
      MESSAGE = pg_catalog.format('trigger %I on %s is not the enabled trigger of this job', trigger_name, tbl),
      DETAIL = 'It was created with other columns or another keyring, or it is disabled, or it is not immuta''s.',
      HINT = pg_catalog.format('Drop it (DROP TRIGGER %I ON %s) and call immuta_encrypt_column again: the rows already encrypted stay.', trigger_name, tbl);
  END IF;
  -- BEFORE triggers fire in name order: one that fires after this one and changes the plaintext
  -- leaves the encrypted column behind.
  SELECT pg_catalog.string_agg(pg_catalog.quote_ident(t.tgname), ', ' ORDER BY t.tgname) INTO later
    FROM pg_catalog.pg_trigger t
   WHERE t.tgrelid = tbl::oid AND NOT t.tgisinternal AND t.tgname > trigger_name
     AND (t.tgtype::int4 & 3) = 3 AND (t.tgtype::int4 & 20) <> 0
     AND t.tgfoid <> 'immuta.encrypt_column_trigger()'::pg_catalog.regprocedure::oid;
  IF later IS NOT NULL THEN
    RAISE WARNING USING MESSAGE = pg_catalog.format('BEFORE triggers on %s fire after %I: %s', tbl, trigger_name, later),
      DETAIL = pg_catalog.format('If one of them changes %I, the encrypted column keeps the value it had before.', source),
      HINT = 'Rename them so that they sort before it, or make sure they never change the plaintext.';
  END IF;
  job_id := immuta.resume_or_start_job('encrypt', tbl, target, source, context_column, keyring, NULL, batch_size, pause);
  PERFORM @extschema@.immuta_register_column(tbl, target, context_column);
  COMMIT;
  CALL immuta.run_job(job_id);
END
$body$;

-- Installed by immuta_encrypt_column: encrypts the row's source column into its target column as
-- the row is written. TG_ARGV: source, target, context column ('' for none), keyring ('' for the
-- default). Runs as the writer, who needs immuta_encryptor.
CREATE FUNCTION immuta.encrypt_column_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  encrypted pg_catalog.bytea;
  unused pg_catalog.bool;
BEGIN
  -- The target is named in the query too: a renamed or dropped target column is an error here,
  -- where jsonb_populate_record would ignore it.
  EXECUTE 'SELECT ' || immuta.encrypt_expression(TG_ARGV[0], NULLIF(TG_ARGV[2], ''), NULLIF(TG_ARGV[3], ''), '($1).')
          || pg_catalog.format(', ($1).%I IS NULL', TG_ARGV[1])
     INTO encrypted, unused USING NEW;
  NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(TG_ARGV[1], encrypted));
  RETURN NEW;
END
$body$;

REVOKE EXECUTE ON FUNCTION immuta_key_is_current(bigint), immuta_is_current(bytea), immuta_register_column(regclass, name, name),
    immuta_unregister_column(regclass, name), immuta_key_references(bigint), immuta.key_references(bigint),
    immuta.encrypt_expression(name, name, text, text), immuta.check_job_table(regclass), immuta.column_type(regclass, name),
    immuta.check_job_options(integer, interval, bigint), immuta.encrypt_trigger_name(name),
    immuta.resume_or_start_job(text, regclass, name, name, name, text, bigint, integer, interval, text),
    immuta.encrypt_column_trigger(), immuta.check_encryptable(regtype), immuta.context_expression(name, text),
    immuta.encrypt_value(anyelement, boolean, text, text) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE immuta_reencrypt_column(regclass, name, name, integer, interval, bigint),
    immuta_encrypt_column(regclass, name, name, name, text, integer, interval), immuta.run_job(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta_key_is_current(bigint), immuta_is_current(bytea) TO immuta_decryptor;
GRANT EXECUTE ON PROCEDURE immuta_reencrypt_column(regclass, name, name, integer, interval, bigint) TO immuta_decryptor;
GRANT EXECUTE ON PROCEDURE immuta_encrypt_column(regclass, name, name, name, text, integer, interval) TO immuta_encryptor;
GRANT EXECUTE ON PROCEDURE immuta.run_job(bigint) TO immuta_decryptor, immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta_register_column(regclass, name, name), immuta_unregister_column(regclass, name),
    immuta.encrypt_expression(name, name, text, text), immuta.check_job_table(regclass), immuta.column_type(regclass, name),
    immuta.check_job_options(integer, interval, bigint), immuta.encrypt_trigger_name(name),
    immuta.context_expression(name, text)
    TO immuta_decryptor, immuta_encryptor, immuta_admin;
GRANT EXECUTE ON FUNCTION immuta.resume_or_start_job(text, regclass, name, name, name, text, bigint, integer, interval, text)
    TO immuta_decryptor, immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta.resume_or_start_job(text, regclass, name, name, name, text, bigint, integer, interval, text)
    TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON FUNCTION immuta_register_column(regclass, name, name), immuta_unregister_column(regclass, name),
    immuta.encrypt_expression(name, name, text, text), immuta.check_job_table(regclass), immuta.column_type(regclass, name),
    immuta.check_job_options(integer, interval, bigint), immuta.encrypt_trigger_name(name),
    immuta.context_expression(name, text)
    TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON FUNCTION immuta.encrypt_column_trigger(), immuta.check_encryptable(regtype),
    immuta.encrypt_value(anyelement, boolean, text, text) TO immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta.encrypt_column_trigger(), immuta.check_encryptable(regtype),
    immuta.encrypt_value(anyelement, boolean, text, text) TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON PROCEDURE immuta.run_job(bigint) TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON FUNCTION immuta_key_references(bigint), immuta.key_references(bigint) TO immuta_admin;
GRANT USAGE ON SCHEMA immuta TO immuta_decryptor, immuta_encryptor;
-- Only what the procedures write: never a job's id, owner or start.
GRANT SELECT, INSERT (kind, relid, column_name, source_column, context_column, keyring, before_key, batch_size, pause,
                      index_name),
    UPDATE (source_column, context_column, keyring, before_key, batch_size, pause, last_batch_at, finished_at, passes,
            next_block, rows_done, rows_total, rows_skipped, index_name)
    ON immuta.jobs TO immuta_decryptor, immuta_encryptor;
GRANT SELECT, INSERT (relid, column_name, context_column), UPDATE (context_column, registered_by, registered_at), DELETE
    ON immuta.encrypted_columns TO immuta_decryptor, immuta_encryptor, immuta_admin;
GRANT SELECT ON immuta.jobs_progress TO immuta_decryptor, immuta_encryptor, immuta_admin;
GRANT EXECUTE ON FUNCTION immuta_key_is_current(bigint), immuta_is_current(bytea), immuta_register_column(regclass, name, name),
    immuta_unregister_column(regclass, name), immuta_key_references(bigint), immuta.key_references(bigint)
    TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON PROCEDURE immuta_reencrypt_column(regclass, name, name, integer, interval, bigint),
    immuta_encrypt_column(regclass, name, name, name, text, integer, interval) TO @extowner@ WITH GRANT OPTION;
GRANT SELECT, INSERT (kind, relid, column_name, source_column, context_column, keyring, before_key, batch_size, pause,
                      index_name),
    UPDATE (source_column, context_column, keyring, before_key, batch_size, pause, last_batch_at, finished_at, passes,
            next_block, rows_done, rows_total, rows_skipped, index_name)
    ON immuta.jobs TO @extowner@ WITH GRANT OPTION;
GRANT SELECT ON immuta.jobs_progress TO @extowner@ WITH GRANT OPTION;
GRANT SELECT, INSERT (relid, column_name, context_column), UPDATE (context_column, registered_by, registered_at), DELETE
    ON immuta.encrypted_columns TO @extowner@ WITH GRANT OPTION;

-- Blind indexes (issue 16): index keys, stored wrapped like data keys but in a table of their own,
-- so that nothing that picks or opens a data key can ever reach one (a ciphertext naming an index
-- key's id names no data key). Their ids come from immuta.key_ids, as data keys' do. One row per
-- version of an index of a keyring; the newest enabled version makes terms, every enabled one
-- matches; a retired (destroyed) version keeps its row as a tombstone without its key.
CREATE TABLE immuta.index_keys (
    id               bigint PRIMARY KEY CHECK (id > 0),
    keyring          text NOT NULL CHECK (keyring ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    name             text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    version          integer NOT NULL CHECK (version BETWEEN 1 AND 65535),
    term_length      smallint NOT NULL CHECK (term_length BETWEEN 4 AND 32),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       name NOT NULL DEFAULT current_user,
    provider         text NOT NULL CHECK (provider IN ('local', 'awsKms')),
    wrapping_key     text NOT NULL,
    wrapping_region  text,
    wrapped_key      bytea,
    -- As immuta.data_keys.server_identity: whether KMS may be reached as the server for it.
    server_identity  boolean NOT NULL DEFAULT false,
    state            text NOT NULL DEFAULT 'enabled' CHECK (state IN ('enabled', 'destroyed')),
    state_changed_at timestamptz,
    state_changed_by name,
    CHECK ((provider = 'awsKms') = (wrapping_region IS NOT NULL)),
    CHECK ((state = 'destroyed') = (wrapped_key IS NULL)),
    UNIQUE (keyring, name, version)
);
COMMENT ON TABLE immuta.index_keys IS 'immuta blind index keys, wrapped; one row per version of an index of a keyring';
SELECT pg_catalog.pg_extension_config_dump('immuta.index_keys', '');
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.index_keys
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
GRANT INSERT ON immuta.index_keys TO @extowner@;

-- The index keys without their key bytes: active (the newest version, which makes terms),
-- previous (still matches), destroyed (retired, or its keyring was destroyed).
CREATE VIEW immuta.blind_index_keys AS
SELECT k.id, k.keyring, k.name, k.version, k.term_length,
       CASE WHEN k.state = 'destroyed' OR r.destroyed_at IS NOT NULL THEN 'destroyed'
            WHEN k.version = (SELECT max(v.version) FROM immuta.index_keys v
                               WHERE v.keyring = k.keyring AND v.name = k.name) THEN 'active'
            ELSE 'previous' END AS state,
       k.created_at, k.created_by, k.provider, k.wrapping_key, k.wrapping_region, k.server_identity,
       k.state_changed_at, k.state_changed_by
  FROM immuta.index_keys k LEFT JOIN immuta.keyrings r ON r.name = k.keyring;
COMMENT ON VIEW immuta.blind_index_keys IS 'immuta blind index keys: which version makes terms, which still match';

-- The term columns kept by immuta_blind_index_column: a retire of an index's older versions is
-- refused while one of them holds their terms. Readable by all; written by the column's writers.
CREATE TABLE immuta.blind_index_columns (
    relid oid NOT NULL,
    column_name name NOT NULL,
    source_column name NOT NULL,
    context_column name,
    index_name text NOT NULL,
    -- NULL: the keyring of each value's own data key.
    keyring text,
    registered_by name NOT NULL DEFAULT current_user,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relid, column_name)
);
ALTER TABLE immuta.blind_index_columns ENABLE ROW LEVEL SECURITY;
CREATE POLICY everyone_reads ON immuta.blind_index_columns FOR SELECT USING (true);
CREATE POLICY column_updaters_register ON immuta.blind_index_columns FOR INSERT
    WITH CHECK (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE')
                AND registered_by OPERATOR(pg_catalog.=) current_user);
CREATE POLICY column_updaters_reregister ON immuta.blind_index_columns FOR UPDATE
    USING (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE'))
    WITH CHECK (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE')
                AND registered_by OPERATOR(pg_catalog.=) current_user);
CREATE POLICY column_updaters_and_admins_unregister ON immuta.blind_index_columns FOR DELETE
    USING (pg_catalog.has_column_privilege(relid, column_name, 'UPDATE')
           OR pg_catalog.pg_has_role('immuta_admin', 'MEMBER'));

-- The expression that computes the term of column `source` (opened with `context_column`) of the
-- row `prefix` names, under index `index_name` of `keyring` (NULL: each value's own keyring).
CREATE FUNCTION immuta.blind_index_expression(source name, context_column name, index_name text, keyring text, prefix text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $body$
SELECT pg_catalog.format('immuta.blind_index_of(%s%I, %s, %s, %L::pg_catalog.text, %L::pg_catalog.text)', prefix, source,
         CASE WHEN context_column IS NULL THEN 'false' ELSE 'true' END,
         CASE WHEN context_column IS NULL THEN 'NULL::pg_catalog.text'
              ELSE immuta.context_expression(context_column, prefix) END,
         index_name, keyring)
$body$;

-- Terms older than `version` of index `index_name` of `keyring` in each registered term column,
-- counted as the caller. Each table is locked SHARE first: writes in progress finish before the
-- count, and new ones wait until the caller's transaction ends (then they use the newest key).
CREATE FUNCTION immuta.blind_index_references(index_name text, keyring text, version integer)
RETURNS TABLE (table_name regclass, column_name name, term_count bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  r record;
  stale text;
BEGIN
  FOR r IN SELECT b.relid, b.column_name, b.source_column, b.keyring FROM immuta.blind_index_columns b
             JOIN pg_catalog.pg_class c ON c.oid = b.relid AND c.relkind = 'r'::"char"
            WHERE b.index_name = blind_index_references.index_name
              AND (b.keyring IS NULL OR b.keyring = blind_index_references.keyring)
              AND c.relpersistence <> 't'::"char"
            ORDER BY c.relname, b.relid, b.column_name LOOP
    -- Checked before the lock, which needs them: a column registered by someone else on a table
    -- the caller may not lock is an error, not a wait.
    IF NOT (pg_catalog.has_table_privilege(r.relid, 'UPDATE') OR pg_catalog.has_table_privilege(r.relid, 'DELETE')
            OR pg_catalog.has_table_privilege(r.relid, 'TRUNCATE')) THEN
      RAISE EXCEPTION USING ERRCODE = '42501',
        MESSAGE = pg_catalog.format('permission denied to lock %s to count the terms of column %I', r.relid::regclass, r.column_name),
        DETAIL = 'The column is registered as holding terms of this blind index; the count locks its table against writes (SHARE mode), which takes UPDATE, DELETE or TRUNCATE on it.',
        HINT = 'Grant it, unregister the column (immuta_unregister_column) if it no longer holds terms, or retire with force => true.';
    END IF;
    -- NOWAIT: a session that holds a write lock makes this fail at once, not hold up every key
    -- creation of the database while it waits.
    BEGIN
      EXECUTE pg_catalog.format('LOCK TABLE ONLY %s IN SHARE MODE NOWAIT', r.relid::regclass);
    EXCEPTION WHEN lock_not_available THEN
      RAISE EXCEPTION USING ERRCODE = '55P03',
        MESSAGE = pg_catalog.format('could not lock %s to count its terms', r.relid::regclass),
        HINT = 'Writes to it are in progress; try again.';
    END;
    CONTINUE WHEN (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = r.relid AND a.attname IN (r.column_name, r.source_column) AND a.attnum > 0::int2
                      AND NOT a.attisdropped AND a.attgenerated = ''::"char"
                      AND a.atttypid = 'pg_catalog.bytea'::pg_catalog.regtype::oid) <> 2;
    IF NOT (pg_catalog.has_column_privilege(r.relid, r.column_name, 'SELECT')
            AND pg_catalog.has_column_privilege(r.relid, r.source_column, 'SELECT')) THEN
      RAISE EXCEPTION USING ERRCODE = '42501',
        MESSAGE = pg_catalog.format('permission denied to count the terms of column %I of %s', r.column_name, r.relid::regclass),
        DETAIL = 'The column is registered as holding terms of this blind index; counting them takes SELECT on it and on its encrypted column.',
        HINT = 'Grant SELECT on both columns, or unregister the column (immuta_unregister_column) if it no longer holds terms.';
    END IF;
    IF pg_catalog.row_security_active(r.relid) THEN
      RAISE EXCEPTION USING ERRCODE = '0A000',
        MESSAGE = pg_catalog.format('row-level security hides rows of %s from this role', r.relid::regclass),
        DETAIL = 'A count of the terms of an index must see every row.',
        HINT = 'Count as a role that bypasses the table''s row-level security (its owner, or a role with BYPASSRLS).';
    END IF;
    stale := pg_catalog.format(
      '%1$I IS NOT NULL AND (pg_catalog.length(%1$I) < 2 OR pg_catalog.get_byte(%1$I, 0) * 256 + pg_catalog.get_byte(%1$I, 1) < $1)',
      r.column_name);
    IF r.keyring IS NULL THEN
      -- Terms of the values of this keyring only: other keyrings' indexes have versions of their own.
      stale := stale || pg_catalog.format(
        ' AND @extschema@.immuta_key_id(pg_catalog.substr(%I, 1, 64)) IN (SELECT k.id FROM immuta.keys k WHERE k.keyring = $2)',
        r.source_column);
    END IF;
    table_name := r.relid::regclass;
    column_name := r.column_name;
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM ONLY %s WHERE %s', r.relid::regclass, stale)
       INTO term_count USING version, keyring;
    RETURN NEXT;
  END LOOP;
END
$body$;

CREATE FUNCTION immuta.blind_index_trigger_name(term name) RETURNS name
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $body$
SELECT pg_catalog.left('immuta_term_' || term, 63)::pg_catalog.name
$body$;

-- Installed by immuta_blind_index_column: computes the term of the row's encrypted column into
-- its term column as the row is written. TG_ARGV: encrypted column, term column, context column
-- ('' for none), index name, keyring ('' for each value's own). Runs as the writer, who needs
-- immuta_decryptor: the term of a stored value is computed from the value itself. It fires on
-- every UPDATE (a trigger of immuta_encrypt_column, which sorts before it, may have changed the
-- encrypted column) and recomputes when the value or its context changed.
CREATE FUNCTION immuta.blind_index_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  term pg_catalog.bytea;
  unused pg_catalog.bool;
  unchanged pg_catalog.bool;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    EXECUTE pg_catalog.format('SELECT ($1).%1$I IS NOT DISTINCT FROM ($2).%1$I', TG_ARGV[0])
            || CASE WHEN TG_ARGV[2] = '' THEN ''
                    ELSE pg_catalog.format(' AND (%s) IS NOT DISTINCT FROM (%s)', immuta.context_expression(TG_ARGV[2], '($1).'),
                                           immuta.context_expression(TG_ARGV[2], '($2).')) END
       INTO unchanged USING NEW, OLD;
    IF unchanged THEN
      RETURN NEW;
    END IF;
  END IF;
  EXECUTE 'SELECT ' || immuta.blind_index_expression(TG_ARGV[0], NULLIF(TG_ARGV[2], ''), TG_ARGV[3], NULLIF(TG_ARGV[4], ''), '($1).')
          || pg_catalog.format(', ($1).%I IS NULL', TG_ARGV[1])
     INTO term, unused USING NEW;
  NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(TG_ARGV[1], term));
  RETURN NEW;
END
$body$;

-- Keeps column `term` of `tbl` holding the blind index terms of encrypted column `source`: a
-- trigger for the writes from now on, then a job (batches that commit, resumable) for the rows
-- already there, and after an index key rotation for the terms of older versions.
CREATE PROCEDURE immuta_blind_index_column(tbl regclass, source name, term name, index_name text,
                                           keyring text DEFAULT NULL, context_column name DEFAULT NULL,
                                           batch_size integer DEFAULT 1000, pause interval DEFAULT '0')
LANGUAGE plpgsql SECURITY INVOKER AS $body$
DECLARE
  job_id pg_catalog.int8;
  trigger_name pg_catalog.name;
  trigger_args pg_catalog.text[];
  existing record;
BEGIN
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  IF tbl IS NULL OR source IS NULL OR term IS NULL OR index_name IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'immuta_blind_index_column needs a table, an encrypted column, a term column and an index';
  END IF;
  PERFORM immuta.check_job_options(batch_size, pause, NULL);
  PERFORM immuta.check_job_table(tbl);
  IF source = term OR source = context_column OR term = context_column THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'the encrypted, term and context columns must be different columns';
  END IF;
  IF immuta.column_type(tbl, source) <> 'pg_catalog.bytea'::pg_catalog.regtype::oid
     OR immuta.column_type(tbl, term) <> 'pg_catalog.bytea'::pg_catalog.regtype::oid THEN
    RAISE EXCEPTION USING ERRCODE = '42804', MESSAGE = pg_catalog.format('columns %I and %I of %s must be of type bytea', source, term, tbl),
      HINT = pg_catalog.format('Add the term column first: ALTER TABLE %s ADD COLUMN %I bytea; then CREATE INDEX ON %s (%I).', tbl, term, tbl, term);
  END IF;
  IF context_column IS NOT NULL THEN
    PERFORM immuta.column_type(tbl, context_column);
  END IF;
  IF NOT (pg_catalog.has_column_privilege(tbl::oid, source, 'SELECT') AND pg_catalog.has_column_privilege(tbl::oid, term, 'SELECT')
          AND pg_catalog.has_column_privilege(tbl::oid, term, 'UPDATE') AND pg_catalog.has_table_privilege(tbl::oid, 'TRIGGER')
          AND (context_column IS NULL OR pg_catalog.has_column_privilege(tbl::oid, context_column, 'SELECT'))) THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format('permission denied for table %s', tbl),
      DETAIL = 'Keeping a term column reads the encrypted column and writes the term column as the caller, and installs a trigger for the writes that arrive meanwhile.',
      HINT = 'The caller needs SELECT on the encrypted (and context) column, SELECT and UPDATE on the term column, and TRIGGER on the table.';
  END IF;
  -- The index exists in the keyring named (with each value's own keyring, every value's keyring
  -- needs it: a write of a value whose keyring lacks it fails).
  IF keyring IS NOT NULL THEN
    EXECUTE 'SELECT @extschema@.immuta_blind_index(''''::pg_catalog.text, $1::pg_catalog.text, $2::pg_catalog.text)'
      USING index_name, keyring;
  END IF;
  trigger_name := immuta.blind_index_trigger_name(term);
  trigger_args := ARRAY[source::pg_catalog.text, term::pg_catalog.text, COALESCE(context_column, ''), index_name, COALESCE(keyring, '')];
  SELECT t.tgfoid, t.tgenabled, t.tgnargs, t.tgargs, t.tgtype, t.tgattr, t.tgqual INTO existing FROM pg_catalog.pg_trigger t
   WHERE t.tgrelid = tbl::oid AND t.tgname = trigger_name;
  IF NOT FOUND THEN
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION immuta.blind_index_trigger(%L, %L, %L, %L, %L)',
      trigger_name, tbl, trigger_args[1], trigger_args[2], trigger_args[3], trigger_args[4], trigger_args[5]);
  ELSIF existing.tgfoid <> 'immuta.blind_index_trigger()'::pg_catalog.regprocedure::oid
        OR existing.tgenabled <> 'O'::"char" OR existing.tgnargs <> 5::int2
        -- BEFORE, FOR EACH ROW, INSERT and UPDATE of any column, no WHEN condition.
        OR existing.tgtype <> 23::int2 OR pg_catalog.cardinality(existing.tgattr::pg_catalog.int2[]) <> 0
        OR existing.tgqual IS NOT NULL
        OR existing.tgargs <> (SELECT pg_catalog.string_agg(pg_catalog.textsend(x.a) || '\x00'::pg_catalog.bytea, ''::pg_catalog.bytea ORDER BY x.n)
                                 FROM pg_catalog.unnest(trigger_args) WITH ORDINALITY AS x(a, n))
  THEN
    RAISE EXCEPTION USING ERRCODE = '55000',
      MESSAGE = pg_catalog.format('trigger %I on %s is not the enabled trigger of this term column', trigger_name, tbl),
      DETAIL = 'It was created with other columns, another index or keyring, or it is disabled, or it is not immuta''s.',
      HINT = pg_catalog.format('Drop it (DROP TRIGGER %I ON %s) and call immuta_blind_index_column again: the terms already computed stay.', trigger_name, tbl);
  END IF;
  job_id := immuta.resume_or_start_job('blind_index', tbl, term, source, context_column, keyring, NULL, batch_size, pause, index_name);
  INSERT INTO immuta.blind_index_columns AS b (relid, column_name, source_column, context_column, index_name, keyring)
  VALUES (tbl::oid, term, source, context_column, immuta_blind_index_column.index_name, immuta_blind_index_column.keyring)
  ON CONFLICT (relid, column_name) DO UPDATE SET source_column = EXCLUDED.source_column,
         context_column = EXCLUDED.context_column, index_name = EXCLUDED.index_name, keyring = EXCLUDED.keyring,
         registered_by = current_user, registered_at = pg_catalog.now();
  COMMIT;
  CALL immuta.run_job(job_id);
END
$body$;

-- Terms are the decryptor's: a term is an equality test on a value, and with a guess at a
-- low-entropy value (an SSN) it is as good as decrypting it; an encrypt-only role must not get
-- one. The index keys' administration is the admin's.
REVOKE EXECUTE ON FUNCTION immuta_blind_index(text, text, text), immuta_blind_index(anyelement, text, text),
    immuta_blind_indexes(text, text, text), immuta_blind_indexes(anyelement, text, text),
    immuta_blind_index_create(text, text, integer), immuta_blind_index_rotate(text, text),
    immuta_blind_index_retire(text, text, text, boolean),
    immuta.blind_index_of(bytea, boolean, text, text, text), immuta.blind_index_pending(bytea, bytea, text, text),
    immuta.blind_index_expression(name, name, text, text, text), immuta.blind_index_references(text, text, integer),
    immuta.blind_index_trigger_name(name), immuta.blind_index_trigger() FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE immuta_blind_index_column(regclass, name, name, text, text, name, integer, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta_blind_index(text, text, text), immuta_blind_index(anyelement, text, text),
    immuta_blind_indexes(text, text, text), immuta_blind_indexes(anyelement, text, text)
    TO immuta_decryptor;
GRANT EXECUTE ON FUNCTION immuta.blind_index_of(bytea, boolean, text, text, text),
    immuta.blind_index_pending(bytea, bytea, text, text), immuta.blind_index_expression(name, name, text, text, text),
    immuta.blind_index_trigger_name(name), immuta.blind_index_trigger() TO immuta_decryptor;
GRANT EXECUTE ON PROCEDURE immuta_blind_index_column(regclass, name, name, text, text, name, integer, interval) TO immuta_decryptor;
GRANT EXECUTE ON FUNCTION immuta_blind_index_create(text, text, integer), immuta_blind_index_rotate(text, text),
    immuta_blind_index_retire(text, text, text, boolean), immuta.blind_index_references(text, text, integer) TO immuta_admin;
GRANT SELECT ON immuta.blind_index_keys TO immuta_admin;
GRANT SELECT, INSERT (relid, column_name, source_column, context_column, index_name, keyring),
    UPDATE (source_column, context_column, index_name, keyring, registered_by, registered_at), DELETE
    ON immuta.blind_index_columns TO immuta_decryptor, immuta_encryptor, immuta_admin;
GRANT EXECUTE ON FUNCTION immuta_blind_index(text, text, text), immuta_blind_index(anyelement, text, text),
    immuta_blind_indexes(text, text, text), immuta_blind_indexes(anyelement, text, text),
    immuta_blind_index_create(text, text, integer), immuta_blind_index_rotate(text, text),
    immuta_blind_index_retire(text, text, text, boolean),
    immuta.blind_index_of(bytea, boolean, text, text, text), immuta.blind_index_pending(bytea, bytea, text, text),
    immuta.blind_index_expression(name, name, text, text, text), immuta.blind_index_references(text, text, integer),
    immuta.blind_index_trigger_name(name), immuta.blind_index_trigger()
    TO @extowner@ WITH GRANT OPTION;
GRANT EXECUTE ON PROCEDURE immuta_blind_index_column(regclass, name, name, text, text, name, integer, interval)
    TO @extowner@ WITH GRANT OPTION;
GRANT SELECT ON immuta.blind_index_keys TO @extowner@ WITH GRANT OPTION;
GRANT SELECT, INSERT (relid, column_name, source_column, context_column, index_name, keyring),
    UPDATE (source_column, context_column, index_name, keyring, registered_by, registered_at), DELETE
    ON immuta.blind_index_columns TO @extowner@ WITH GRANT OPTION;

-- Logical replication (issue 17, src/replication.rs, docs/DISTRIBUTED.md): a subscription applies
-- rows with session_replication_role = replica, where only triggers enabled for replication fire.
-- This one, on every table of immuta's, acts only in a logical replication worker: it refuses an
-- apply that does not run as a superuser, trusts no replicated wrapping with the server's own
-- AWS identity, passes the keys, keyrings and audit entries on to every backend's cache, and
-- drops the rows of the tables that belong to one server (its configuration, usage counts, jobs,
-- registered columns).
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.data_keys
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.index_keys
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.keyrings
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.audit_log
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.config
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.key_usage
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.jobs
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.encrypted_columns
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
CREATE TRIGGER replicated_change BEFORE INSERT OR UPDATE OR DELETE ON immuta.blind_index_columns
    FOR EACH ROW EXECUTE FUNCTION immuta.replicated_change();
ALTER TABLE immuta.data_keys ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.index_keys ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.keyrings ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.audit_log ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.config ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.key_usage ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.jobs ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.encrypted_columns ENABLE REPLICA TRIGGER replicated_change;
ALTER TABLE immuta.blind_index_columns ENABLE REPLICA TRIGGER replicated_change;
REVOKE EXECUTE ON FUNCTION immuta.replicated_change() FROM PUBLIC;
-- The restore guard fires in every session_replication_role (a session in `replica` mode is no
-- way around it); it leaves a subscription's rows to replicated_change.
ALTER TABLE immuta.data_keys ENABLE ALWAYS TRIGGER restore_only;
ALTER TABLE immuta.index_keys ENABLE ALWAYS TRIGGER restore_only;
ALTER TABLE immuta.keyrings ENABLE ALWAYS TRIGGER restore_only;
ALTER TABLE immuta.audit_log ENABLE ALWAYS TRIGGER restore_only;
ALTER TABLE immuta.config ENABLE ALWAYS TRIGGER restore_only;
ALTER TABLE immuta.key_usage ENABLE ALWAYS TRIGGER restore_only;
