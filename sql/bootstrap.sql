-- immuta bootstrap: the internal schema and its tables, created before any function.
--
-- CREATE SCHEMA without IF NOT EXISTS on purpose: immuta must own the schema that holds its
-- keys, and must not adopt one that somebody else created beforehand.
-- Every function call and operator in this file and in finalize.sql is schema-qualified: the
-- script runs as a superuser (also in a trusted install by a database owner), with the target
-- schema, which the installer may control, on the search_path, and an unqualified call could
-- bind, for good, to a look-alike planted there (e.g. nextval(text) beats nextval(regclass) for
-- a string literal).
CREATE SCHEMA immuta;
COMMENT ON SCHEMA immuta IS 'immuta internals: data keys (wrapped), configuration';

-- The three roles (README, "Roles"). Roles belong to the cluster, not to a database: they are
-- created when absent and left in place by DROP EXTENSION, since other databases may use them.
-- NOLOGIN: they are granted to login roles. Membership is granted by superusers only (nobody
-- gets ADMIN OPTION from this script): a role that can create a database must not gain, by
-- installing immuta there, immuta's privileges in every other database. A role of these names
-- that can log in or is a superuser was not made by immuta: refuse to adopt it.
DO $roles$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['immuta_admin', 'immuta_encryptor', 'immuta_decryptor'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) name) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', name);
        ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                      WHERE r.rolname OPERATOR(pg_catalog.=) name AND (r.rolcanlogin OR r.rolsuper)) THEN
            RAISE EXCEPTION 'role "%" exists and can log in or is a superuser', name
                USING ERRCODE = '42710',
                      DETAIL = 'immuta grants its privileges to roles of this name; this one was not created by immuta.',
                      HINT = pg_catalog.format('ALTER ROLE %I NOLOGIN NOSUPERUSER, or drop it, then CREATE EXTENSION immuta again.', name);
        END IF;
    END LOOP;
END
$roles$;

-- Data keys. A row holds the key only wrapped (encrypted) by its provider, plus what is needed
-- to find the wrapping key again: the provider, the master key fingerprint or KMS key, and for
-- KMS the region. The newest id is the key that encrypts.
CREATE SEQUENCE immuta.data_keys_id_seq AS bigint;

CREATE TABLE immuta.data_keys (
    id               bigint PRIMARY KEY DEFAULT pg_catalog.nextval('immuta.data_keys_id_seq'::pg_catalog.regclass),
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    provider         text NOT NULL CHECK (provider OPERATOR(pg_catalog.=) ANY (ARRAY['local', 'awsKms']::pg_catalog.text[])),
    wrapping_key     text NOT NULL,
    wrapping_region  text,
    wrapped_key      bytea NOT NULL,
    reason           text NOT NULL CHECK (reason OPERATOR(pg_catalog.=) ANY (ARRAY['first use', 'manual', 'schedule', 'usage limit']::pg_catalog.text[])),
    created_by       name NOT NULL DEFAULT current_user,
    -- The key an automatic rollover replaced (0 for the first key): unique, so two sessions can
    -- never both roll the same key over. NULL for manual rotations.
    rolled_over_from bigint UNIQUE,
    CHECK ((provider OPERATOR(pg_catalog.=) 'awsKms') OPERATOR(pg_catalog.=) (wrapping_region IS NOT NULL))
);
ALTER SEQUENCE immuta.data_keys_id_seq OWNED BY immuta.data_keys.id;
COMMENT ON TABLE immuta.data_keys IS 'immuta data keys, wrapped; the newest id encrypts, all decrypt';

-- pg_dump must carry the keys (and their sequence, so restored databases never reuse an id).
SELECT pg_catalog.pg_extension_config_dump('immuta.data_keys', '');
SELECT pg_catalog.pg_extension_config_dump('immuta.data_keys_id_seq', '');

-- Encryptions counted per key (the usage limit, immuta.max_encryptions_per_key). Append-only:
-- a row reserves a block of encryptions *before* they are used, so the sum per key is never
-- less than what committed transactions encrypted, and a crash loses no reservation that
-- committed. Concurrent sessions append without waiting for each other (no row is updated).
-- About a thousand rows per key over its life; see README.md, "Usage limit".
CREATE TABLE immuta.key_usage (
    key_id       bigint NOT NULL,
    encryptions  bigint NOT NULL CHECK (encryptions OPERATOR(pg_catalog.>) 0),
    reserved_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX key_usage_key_id ON immuta.key_usage (key_id);
COMMENT ON TABLE immuta.key_usage IS 'immuta encryptions counted per data key, reserved ahead in blocks';
SELECT pg_catalog.pg_extension_config_dump('immuta.key_usage', '');

-- Every key event: created, rotated (and why), rewrapped, cache reset; with who and when.
-- Readable by immuta_admin (sql/finalize.sql). Carried by pg_dump.
CREATE SEQUENCE immuta.audit_log_id_seq AS bigint;
CREATE TABLE immuta.audit_log (
    id           bigint PRIMARY KEY DEFAULT pg_catalog.nextval('immuta.audit_log_id_seq'::pg_catalog.regclass),
    at           timestamptz NOT NULL DEFAULT pg_catalog.now(),
    event        text NOT NULL CHECK (event OPERATOR(pg_catalog.=) ANY (ARRAY['key created', 'key rotated', 'key rewrapped', 'cache reset']::pg_catalog.text[])),
    key_id       bigint,
    reason       text NOT NULL CHECK (reason OPERATOR(pg_catalog.=) ANY (ARRAY['first use', 'manual', 'schedule', 'usage limit']::pg_catalog.text[])),
    -- The role whose privileges ran the event, and the role that logged in (they differ after
    -- SET ROLE or in a SECURITY DEFINER function).
    role         name NOT NULL DEFAULT current_user,
    session_role name NOT NULL DEFAULT session_user,
    detail       jsonb NOT NULL DEFAULT '{}'::pg_catalog.jsonb
);
ALTER SEQUENCE immuta.audit_log_id_seq OWNED BY immuta.audit_log.id;
COMMENT ON TABLE immuta.audit_log IS 'immuta key events: creation, rotation with its reason, rewrap, cache reset';
SELECT pg_catalog.pg_extension_config_dump('immuta.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('immuta.audit_log_id_seq', '');

-- The configuration stored by immuta_configure(): one row of YAML.
CREATE TABLE immuta.config (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    yaml             text NOT NULL,
    -- Whether the YAML holds AWS credentials (extraKmsConfig.credentials).
    has_credentials  boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_by       name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE immuta.config IS 'immuta configuration (Immuta Advanced Configuration YAML), set by immuta_configure()';
-- pg_dump carries the configuration, except one that holds credentials: a dump file is not a
-- place for secrets. After restoring such a database, run immuta_configure() again.
SELECT pg_catalog.pg_extension_config_dump('immuta.config', 'WHERE NOT has_credentials');

-- Restoring a dump (pg_restore COPYs these tables' rows and sets their sequences) must work for
-- a database owner who is not a superuser, as on managed platforms. So the role that installed
-- immuta may add rows and set the sequences, and nothing else; the triggers below confine even
-- that to a restore: rows may be added directly only to a table that is still empty (a fresh
-- installation), and a configuration added directly by a role that is not a superuser is left
-- out with a WARNING (it could make immuta use the server's own AWS identity). immuta's own
-- writes run as the tables' owner and pass straight through.
GRANT USAGE ON SCHEMA immuta TO @extowner@;
GRANT INSERT ON immuta.data_keys, immuta.key_usage, immuta.audit_log, immuta.config TO @extowner@;
GRANT UPDATE ON SEQUENCE immuta.data_keys_id_seq, immuta.audit_log_id_seq TO @extowner@;

-- Whether a direct insert comes from immuta itself (the tables' owner) or a superuser.
CREATE FUNCTION immuta.inserter_is_trusted(rel pg_catalog.oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) rel)
               OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
        OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
$$;

-- Whether one of immuta's restorable tables has rows (the inserter may not read them).
CREATE FUNCTION immuta.table_has_rows(rel pg_catalog.oid) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF rel OPERATOR(pg_catalog.=) 'immuta.data_keys'::pg_catalog.regclass THEN
        RETURN EXISTS (SELECT 1 FROM immuta.data_keys);
    ELSIF rel OPERATOR(pg_catalog.=) 'immuta.key_usage'::pg_catalog.regclass THEN
        RETURN EXISTS (SELECT 1 FROM immuta.key_usage);
    ELSIF rel OPERATOR(pg_catalog.=) 'immuta.audit_log'::pg_catalog.regclass THEN
        RETURN EXISTS (SELECT 1 FROM immuta.audit_log);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION immuta.guard_restore() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT immuta.inserter_is_trusted(TG_RELID) AND immuta.table_has_rows(TG_RELID) THEN
        RAISE EXCEPTION 'rows may be added to immuta.% directly only by a restore into a fresh installation', TG_TABLE_NAME
            USING ERRCODE = '42501',
                  DETAIL = 'The table already has rows: immuta adds rows itself, through its functions.',
                  HINT = 'Restore into a new database where CREATE EXTENSION immuta has just run, or ask a superuser.';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION immuta.guard_config_restore() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF immuta.inserter_is_trusted(TG_RELID) THEN
        RETURN NEW;
    END IF;
    RAISE WARNING 'immuta configuration not restored'
        USING DETAIL = 'Only a superuser may store a configuration other than through immuta_configure().',
              HINT = 'Run SELECT immuta_configure(...) with the configuration.';
    RETURN NULL;
END
$$;

CREATE TRIGGER restore_only BEFORE INSERT ON immuta.data_keys
    FOR EACH STATEMENT EXECUTE FUNCTION immuta.guard_restore();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.key_usage
    FOR EACH STATEMENT EXECUTE FUNCTION immuta.guard_restore();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION immuta.guard_restore();
CREATE TRIGGER restore_only BEFORE INSERT ON immuta.config
    FOR EACH ROW EXECUTE FUNCTION immuta.guard_config_restore();

REVOKE ALL ON FUNCTION immuta.inserter_is_trusted(pg_catalog.oid), immuta.table_has_rows(pg_catalog.oid),
    immuta.guard_restore(), immuta.guard_config_restore() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION immuta.inserter_is_trusted(pg_catalog.oid), immuta.table_has_rows(pg_catalog.oid),
    immuta.guard_restore(), immuta.guard_config_restore() TO @extowner@;
