-- immuta 0.1.0 -> 0.2.0: the fixes of the security review (issue 11) and the new functions.
--
-- Run by ALTER EXTENSION immuta UPDATE, as a superuser (also when a database owner runs it for
-- the trusted extension), with the extension's schema first on the search_path. As in the
-- install script, every name is schema-qualified and every operator is OPERATOR(pg_catalog.x):
-- nothing here may bind to an object the database owner planted. The result must equal a fresh
-- installation of 0.2.0 object for object (tests/upgrade.rs compares the two).

-- Key ids come from a private sequence, which nobody but immuta moves and which is not dumped;
-- it starts past the highest existing id (immuta raises it past the highest id before each use
-- anyway).
CREATE SEQUENCE immuta.key_ids AS bigint;
COMMENT ON SEQUENCE immuta.key_ids IS 'immuta data key ids: private, never reused; its lock serialises key creation';
SELECT pg_catalog.setval('immuta.key_ids'::pg_catalog.regclass, m)
FROM (SELECT pg_catalog.max(id) AS m FROM immuta.data_keys) k WHERE m IS NOT NULL;

-- The in-use mark closes the window in which rows may be added directly (a restore into a fresh
-- installation): an installation that holds anything has been used.
CREATE SEQUENCE immuta.in_use_marker AS bigint;
COMMENT ON SEQUENCE immuta.in_use_marker IS 'immuta has written in this installation once it has been called';
-- As the install script's REVOKE ALL ON ALL SEQUENCES leaves them: privileges explicit, none for PUBLIC.
REVOKE ALL ON SEQUENCE immuta.key_ids, immuta.in_use_marker FROM PUBLIC;
SELECT pg_catalog.nextval('immuta.in_use_marker'::pg_catalog.regclass)
WHERE EXISTS (SELECT 1 FROM immuta.data_keys) OR EXISTS (SELECT 1 FROM immuta.config)
   OR EXISTS (SELECT 1 FROM immuta.audit_log) OR EXISTS (SELECT 1 FROM immuta.key_usage);

-- Key ids are positive (a restored row is held to it too).
ALTER TABLE immuta.data_keys ADD CONSTRAINT data_keys_id_check CHECK (id OPERATOR(pg_catalog.>) 0);

-- Whether a superuser stored the configuration: only then may it make immuta call AWS KMS with
-- the server's own identity. 0.1.0 did not record who stored it in a way this script can trust
-- (the role named may be a superuser today, the row may have come from a restore), so every
-- existing configuration is false: a superuser re-runs immuta_configure() to put it in force.
-- (Added without a default, filled, then given its default and NOT NULL: the column is then
-- stored as in a fresh installation, with no "missing value" for the existing row.)
ALTER TABLE immuta.config ADD COLUMN by_superuser boolean;
UPDATE immuta.config SET by_superuser = false;
ALTER TABLE immuta.config ALTER COLUMN by_superuser SET DEFAULT false, ALTER COLUMN by_superuser SET NOT NULL;

-- Whether immuta may reach a key's KMS key with the server's own AWS identity. 0.1.0 could not
-- tell a key it created from a row a tenant added (by a restore, or before this update), and
-- nothing about the session that runs this script vouches for the rows (it may not even be a
-- session the superuser started on purpose), so every existing key is false. A superuser
-- vouches for the keys with UPDATE immuta.data_keys SET server_identity = true WHERE ..., or
-- the configuration gives explicit credentials; immuta's error names the key and says so.
ALTER TABLE immuta.data_keys ADD COLUMN server_identity boolean;
UPDATE immuta.data_keys SET server_identity = false;
ALTER TABLE immuta.data_keys ALTER COLUMN server_identity SET DEFAULT false,
    ALTER COLUMN server_identity SET NOT NULL;

-- The guard of direct inserts (a restore) is immuta's own code now, per row: the statement
-- triggers and their PL/pgSQL functions, which a savepoint or a snapshot could get past, go.
DROP TRIGGER restore_only ON immuta.data_keys;
DROP TRIGGER restore_only ON immuta.key_usage;
DROP TRIGGER restore_only ON immuta.audit_log;
DROP TRIGGER restore_only ON immuta.config;
DROP FUNCTION immuta.guard_restore();
DROP FUNCTION immuta.guard_config_restore();
DROP FUNCTION immuta.table_has_rows(pg_catalog.oid);
DROP FUNCTION immuta.inserter_is_trusted(pg_catalog.oid);
CREATE FUNCTION immuta.guard_direct_insert() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'guard_direct_insert_wrapper';
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.data_keys
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.key_usage
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.audit_log
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.config
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_direct_insert();
REVOKE EXECUTE ON FUNCTION immuta.guard_direct_insert() FROM PUBLIC;

-- immuta_cache_reset() gains all_databases. Dropped and created again (a function's arguments
-- cannot change in place): EXECUTE that a role was granted on the old function directly, not
-- through immuta_admin, must be granted again.
DROP FUNCTION @extschema@.immuta_cache_reset();
CREATE FUNCTION @extschema@."immuta_cache_reset"(
	"all_databases" bool DEFAULT false /* bool */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'immuta_cache_reset_scoped_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.immuta_cache_reset(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.immuta_cache_reset(boolean) TO immuta_admin;
GRANT EXECUTE ON FUNCTION @extschema@.immuta_cache_reset(boolean) TO @extowner@ WITH GRANT OPTION;

-- The scheduled job's command: a function in pg_catalog, where a database owner can plant
-- nothing. Jobs scheduled by 0.1.0 keep their old command until immuta_schedule_rotation() runs
-- again (immuta_status() reports them as outdated); pg_cron's table is usually in another
-- database, out of this script's reach.
CREATE FUNCTION pg_catalog.immuta_rotation_job() RETURNS bigint VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_rotation_job_wrapper';
REVOKE EXECUTE ON FUNCTION pg_catalog.immuta_rotation_job() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_catalog.immuta_rotation_job() TO immuta_admin;
GRANT EXECUTE ON FUNCTION pg_catalog.immuta_rotation_job() TO @extowner@ WITH GRANT OPTION;

-- The keys view shows server_identity (a new last column: the view is replaced in place and
-- keeps its grants).
CREATE OR REPLACE VIEW immuta.keys AS
SELECT k.id,
       k.created_at,
       k.provider,
       k.wrapping_key,
       k.wrapping_region,
       k.reason,
       k.created_by,
       k.id OPERATOR(pg_catalog.=) c.current_id AS is_current,
       CASE WHEN k.id OPERATOR(pg_catalog.=) c.current_id
            THEN k.created_at OPERATOR(pg_catalog.+) pg_catalog.make_interval(
                     secs => immuta.rollover_length_days()::pg_catalog.float8 OPERATOR(pg_catalog.*) 86400.0::pg_catalog.float8)
       END AS rollover_due_at,
       immuta.encryptions_counted(k.id) AS encryptions,
       CASE WHEN k.id OPERATOR(pg_catalog.=) c.current_id THEN immuta.max_encryptions_per_key() END AS max_encryptions,
       k.server_identity
FROM immuta.data_keys k
CROSS JOIN (SELECT pg_catalog.max(id) AS current_id FROM immuta.data_keys) c;

-- Typed values bound to their place (format 2): every built-in type immuta knows, in and out,
-- and a context that is authenticated with the value. immuta_encrypt(text) and
-- immuta_decrypt(bytea) keep their signatures; new values are format 2, format 1 reads forever.
CREATE FUNCTION immuta_encrypt(plaintext text, context text) RETURNS bytea VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_text_context_wrapper';
CREATE FUNCTION immuta_encrypt(value anyelement) RETURNS bytea VOLATILE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_value_wrapper';
CREATE FUNCTION immuta_encrypt(value anyelement, context text) RETURNS bytea VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_value_context_wrapper';
CREATE FUNCTION immuta_decrypt(ciphertext bytea, context text) RETURNS text STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_context_wrapper';
CREATE FUNCTION immuta_decrypt(ciphertext bytea, as_type anyelement) RETURNS anyelement STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_as_wrapper';
CREATE FUNCTION immuta_decrypt(ciphertext bytea, as_type anyelement, context text) RETURNS anyelement STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_as_context_wrapper';
CREATE FUNCTION immuta_decrypt_bytea(ciphertext bytea) RETURNS bytea STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_bytea_wrapper';
CREATE FUNCTION immuta_decrypt_bytea(ciphertext bytea, context text) RETURNS bytea STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_bytea_context_wrapper';
CREATE FUNCTION immuta_decrypt_jsonb(ciphertext bytea) RETURNS jsonb STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_jsonb_wrapper';
CREATE FUNCTION immuta_decrypt_jsonb(ciphertext bytea, context text) RETURNS jsonb STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_jsonb_context_wrapper';
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
