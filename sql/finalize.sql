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
    immuta_key_destroy(bigint, text), immuta_disable_keys_before(text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta_encrypt(anyelement, @extschema@.immuta_keyring), immuta_encrypt(anyelement, text, @extschema@.immuta_keyring),
    immuta_encrypt(text, @extschema@.immuta_keyring), immuta_encrypt(text, text, @extschema@.immuta_keyring)
    TO immuta_encryptor;
GRANT EXECUTE ON FUNCTION immuta_rotate(text), immuta_status(text),
    immuta_keyring_create(text, integer, text, text), immuta_keyring_configure(text, integer, text, text),
    immuta_keyring_destroy(text, text), immuta_key_disable(bigint, text), immuta_key_enable(bigint, text),
    immuta_key_destroy(bigint, text), immuta_disable_keys_before(text, bigint, text) TO immuta_admin;
GRANT EXECUTE ON FUNCTION immuta_encrypt(anyelement, @extschema@.immuta_keyring), immuta_encrypt(anyelement, text, @extschema@.immuta_keyring),
    immuta_encrypt(text, @extschema@.immuta_keyring), immuta_encrypt(text, text, @extschema@.immuta_keyring),
    immuta_rotate(text), immuta_status(text),
    immuta_keyring_create(text, integer, text, text), immuta_keyring_configure(text, integer, text, text),
    immuta_keyring_destroy(text, text), immuta_key_disable(bigint, text), immuta_key_enable(bigint, text),
    immuta_key_destroy(bigint, text), immuta_disable_keys_before(text, bigint, text)
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
