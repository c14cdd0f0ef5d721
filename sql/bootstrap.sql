-- immuta bootstrap: the internal schema and its tables, created before any function.
--
-- CREATE SCHEMA without IF NOT EXISTS on purpose: immuta must own the schema that holds its
-- keys, and must not adopt one that somebody else created beforehand.
CREATE SCHEMA immuta;
COMMENT ON SCHEMA immuta IS 'immuta internals: data keys (wrapped), configuration';

-- The three roles (README, "Roles"). Roles belong to the cluster, not to a database: they are
-- created when absent and left in place by DROP EXTENSION, since other databases may use them.
-- NOLOGIN: they are granted to login roles.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'immuta_admin') THEN
        CREATE ROLE immuta_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'immuta_encryptor') THEN
        CREATE ROLE immuta_encryptor NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'immuta_decryptor') THEN
        CREATE ROLE immuta_decryptor NOLOGIN;
    END IF;
END
$roles$;
COMMENT ON ROLE immuta_admin IS 'immuta: rotate, configure, rewrap, schedule, reset the key cache, read status and audit';
COMMENT ON ROLE immuta_encryptor IS 'immuta: immuta_encrypt()';
COMMENT ON ROLE immuta_decryptor IS 'immuta: immuta_decrypt()';
-- Whoever installs immuta (a superuser, or a database owner where the extension is trusted)
-- holds the three roles and may grant them on.
GRANT immuta_admin, immuta_encryptor, immuta_decryptor TO @extowner@ WITH ADMIN OPTION;

-- Data keys. A row holds the key only wrapped (encrypted) by its provider, plus what is needed
-- to find the wrapping key again: the provider, the master key fingerprint or KMS key, and for
-- KMS the region. The newest id is the key that encrypts.
CREATE SEQUENCE immuta.data_keys_id_seq AS bigint;

CREATE TABLE immuta.data_keys (
    id               bigint PRIMARY KEY DEFAULT nextval('immuta.data_keys_id_seq'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    provider         text NOT NULL CHECK (provider IN ('local', 'awsKms')),
    wrapping_key     text NOT NULL,
    wrapping_region  text,
    wrapped_key      bytea NOT NULL,
    reason           text NOT NULL CHECK (reason IN ('first use', 'manual', 'schedule', 'usage limit')),
    created_by       name NOT NULL DEFAULT current_user,
    -- The key an automatic rollover replaced (0 for the first key): unique, so two sessions can
    -- never both roll the same key over. NULL for manual rotations.
    rolled_over_from bigint UNIQUE,
    CHECK ((provider = 'awsKms') = (wrapping_region IS NOT NULL))
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
    encryptions  bigint NOT NULL CHECK (encryptions > 0),
    reserved_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_usage_key_id ON immuta.key_usage (key_id);
COMMENT ON TABLE immuta.key_usage IS 'immuta encryptions counted per data key, reserved ahead in blocks';
SELECT pg_catalog.pg_extension_config_dump('immuta.key_usage', '');

-- Every key event: created, rotated (and why), rewrapped, cache reset; with who and when.
-- Readable by immuta_admin (sql/finalize.sql). Carried by pg_dump.
CREATE SEQUENCE immuta.audit_log_id_seq AS bigint;
CREATE TABLE immuta.audit_log (
    id           bigint PRIMARY KEY DEFAULT nextval('immuta.audit_log_id_seq'),
    at           timestamptz NOT NULL DEFAULT now(),
    event        text NOT NULL CHECK (event IN ('key created', 'key rotated', 'key rewrapped', 'cache reset')),
    key_id       bigint,
    reason       text NOT NULL CHECK (reason IN ('first use', 'manual', 'schedule', 'usage limit')),
    -- The role whose privileges ran the event, and the role that logged in (they differ after
    -- SET ROLE or in a SECURITY DEFINER function).
    role         name NOT NULL DEFAULT current_user,
    session_role name NOT NULL DEFAULT session_user,
    detail       jsonb NOT NULL DEFAULT '{}'
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
    updated_at       timestamptz NOT NULL DEFAULT now(),
    updated_by       name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE immuta.config IS 'immuta configuration (Immuta Advanced Configuration YAML), set by immuta_configure()';
-- pg_dump carries the configuration, except one that holds credentials: a dump file is not a
-- place for secrets. After restoring such a database, run immuta_configure() again.
SELECT pg_catalog.pg_extension_config_dump('immuta.config', 'WHERE NOT has_credentials');

-- What a restore does to these tables (COPY their rows, setval their sequences), the role that
-- installed immuta may do, so that a database owner who is not a superuser can restore a dump
-- (as on managed platforms). It may add rows; it may neither read nor change nor delete any.
GRANT USAGE ON SCHEMA immuta TO @extowner@;
GRANT INSERT ON immuta.data_keys, immuta.key_usage, immuta.audit_log, immuta.config TO @extowner@;
GRANT UPDATE ON SEQUENCE immuta.data_keys_id_seq, immuta.audit_log_id_seq TO @extowner@;
