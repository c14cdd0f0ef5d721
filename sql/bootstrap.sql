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
--
-- The two sequences that dumps carry (data_keys_id_seq, audit_log_id_seq) are set by every
-- restore, so the role that installed immuta may move them (see the grants below): they decide
-- nothing. Key ids come from immuta.key_ids, which no role but immuta's own queries can move and
-- which is not dumped (immuta raises it past the highest restored id before use); audit ids are
-- one above the highest, under the key creation lock.
CREATE SEQUENCE immuta.data_keys_id_seq AS bigint;
CREATE SEQUENCE immuta.key_ids AS bigint;
COMMENT ON SEQUENCE immuta.key_ids IS 'immuta data key ids: private, never reused; its lock serialises key creation';

-- Marks the installation as in use: immuta calls nextval() on it before its first own write.
-- Not rolled back, seen by every transaction whatever its snapshot, never waited for: once it
-- has been called, the restore window (src/restore.rs) is closed for good. Not dumped: a
-- restored database is a fresh installation until immuta writes in it.
CREATE SEQUENCE immuta.in_use_marker AS bigint;
COMMENT ON SEQUENCE immuta.in_use_marker IS 'immuta has written in this installation once it has been called';

CREATE TABLE immuta.data_keys (
    id               bigint PRIMARY KEY DEFAULT pg_catalog.nextval('immuta.data_keys_id_seq'::pg_catalog.regclass)
                     CHECK (id OPERATOR(pg_catalog.>) 0),
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    provider         text NOT NULL CHECK (provider OPERATOR(pg_catalog.=) ANY (ARRAY['local', 'awsKms']::pg_catalog.text[])),
    wrapping_key     text NOT NULL,
    wrapping_region  text,
    wrapped_key      bytea,
    reason           text NOT NULL CHECK (reason OPERATOR(pg_catalog.=) ANY (ARRAY['first use', 'manual', 'schedule', 'usage limit']::pg_catalog.text[])),
    created_by       name NOT NULL DEFAULT current_user,
    -- The key an automatic rollover replaced (0 for the first key): unique, so two sessions can
    -- never both roll the same key over. NULL for manual rotations.
    -- Unique per keyring (below), so that two sessions can never both roll one key over.
    rolled_over_from bigint,
    -- Whether immuta may reach this key's KMS key with the server's own AWS identity: true when
    -- immuta created or rewrapped the key under a configuration a superuser put in force; false
    -- for a row added directly (a restore: the trigger sets it, whatever the dump says) or
    -- wrapped under a configuration a role that is not a superuser stored (README, "Security
    -- notes"). A superuser may vouch for a row by setting it.
    server_identity  boolean NOT NULL DEFAULT false,
    -- The keyring the key belongs to (immuta.keyrings, or 'default', which has no row there).
    -- No foreign key: a restore loads the tables in any order.
    keyring          text NOT NULL DEFAULT 'default'
                     CONSTRAINT data_keys_keyring_check
                     CHECK (keyring OPERATOR(pg_catalog.~) '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    -- enabled (active if newest of its keyring, else decrypt-only), disabled, or destroyed: then
    -- wrapped_key is erased and the row is a tombstone (crates/immuta-core/src/key_state.rs).
    state            text NOT NULL DEFAULT 'enabled'
                     CONSTRAINT data_keys_state_check
                     CHECK (state OPERATOR(pg_catalog.=) ANY (ARRAY['enabled', 'disabled', 'destroyed']::pg_catalog.text[])),
    state_changed_at timestamptz,
    state_changed_by name,
    CHECK ((provider OPERATOR(pg_catalog.=) 'awsKms') OPERATOR(pg_catalog.=) (wrapping_region IS NOT NULL)),
    CONSTRAINT data_keys_destroyed_check
        CHECK ((state OPERATOR(pg_catalog.=) 'destroyed') OPERATOR(pg_catalog.=) (wrapped_key IS NULL)),
    CONSTRAINT data_keys_keyring_rolled_over_from_key UNIQUE (keyring, rolled_over_from)
);
CREATE INDEX data_keys_keyring_id ON immuta.data_keys (keyring, id);
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
    event        text NOT NULL CONSTRAINT audit_log_event_check CHECK (event OPERATOR(pg_catalog.=) ANY (ARRAY['key created', 'key rotated', 'key rewrapped', 'cache reset', 'key disabled', 'key enabled', 'key destroyed', 'keyring created', 'keyring configured', 'keyring destroyed', 'index key created', 'index key rotated', 'index key destroyed']::pg_catalog.text[])),
    key_id       bigint,
    reason       text NOT NULL CHECK (reason OPERATOR(pg_catalog.=) ANY (ARRAY['first use', 'manual', 'schedule', 'usage limit']::pg_catalog.text[])),
    -- The role whose privileges ran the event, and the role that logged in (they differ after
    -- SET ROLE or in a SECURITY DEFINER function).
    role         name NOT NULL DEFAULT current_user,
    session_role name NOT NULL DEFAULT session_user,
    detail       jsonb NOT NULL DEFAULT '{}'::pg_catalog.jsonb,
    -- The keyring of the event's key or keyring (NULL for events of the whole database).
    keyring      text
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
    updated_by       name NOT NULL DEFAULT current_user,
    -- Whether a superuser stored it: only then may it make immuta call AWS KMS with the server's
    -- own identity (src/providers.rs). Last, as `ALTER TABLE ... ADD COLUMN` of the upgrade from
    -- 0.1.0 puts it.
    by_superuser     boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE immuta.config IS 'immuta configuration (Immuta Advanced Configuration YAML), set by immuta_configure()';
-- pg_dump carries the configuration, except one that holds credentials: a dump file is not a
-- place for secrets. After restoring such a database, run immuta_configure() again.
SELECT pg_catalog.pg_extension_config_dump('immuta.config', 'WHERE NOT has_credentials');

-- Named keyrings (crates/immuta-core/src/keyrings.rs): created by immuta_keyring_create(), each
-- with its own rollover length and KMS key if it has them (NULL: the configuration's). The
-- keyring 'default' has no row. A destroyed keyring keeps its row as a tombstone, so its name is
-- never given to another keyring. Carried by pg_dump.
CREATE TABLE immuta.keyrings (
    name            text PRIMARY KEY
                    CONSTRAINT keyrings_name_check
                    CHECK (name OPERATOR(pg_catalog.~) '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'
                           AND name OPERATOR(pg_catalog.<>) 'default'),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by      name NOT NULL DEFAULT current_user,
    rollover_days   integer CONSTRAINT keyrings_rollover_days_check
                    CHECK (rollover_days OPERATOR(pg_catalog.>=) 1 AND rollover_days OPERATOR(pg_catalog.<=) 36500),
    kms_key         text,
    kms_region      text,
    -- Whether a superuser chose kms_key: only then may immuta reach it with the server's own AWS
    -- identity (as immuta.config.by_superuser). A restore sets it false.
    by_superuser    boolean NOT NULL DEFAULT false,
    destroyed_at    timestamptz,
    destroyed_by    name,
    CONSTRAINT keyrings_kms_check CHECK ((kms_key IS NULL) OPERATOR(pg_catalog.=) (kms_region IS NULL))
);
COMMENT ON TABLE immuta.keyrings IS 'immuta keyrings other than default: their own rollover length and KMS key; destroyed ones stay as tombstones';
SELECT pg_catalog.pg_extension_config_dump('immuta.keyrings', '');

-- The type of the keyring argument of immuta_encrypt(value [, context], keyring => ...): a
-- domain over text, so that the keyring overloads have other argument types than the context
-- ones and a positional second text argument stays a context.
CREATE DOMAIN @extschema@.immuta_keyring AS text;

-- Restoring a dump (pg_restore COPYs these tables' rows and sets their sequences) must work for
-- a database owner who is not a superuser, as on managed platforms. So the role that installed
-- immuta may add rows and set the dumped sequences, and nothing else; the trigger
-- immuta.guard_direct_insert() (src/restore.rs; its triggers are in finalize.sql) confines even that to a
-- restore: only into a fresh installation (immuta has never written in it, and the table has no
-- rows of other transactions, both read whatever the inserter's snapshot), only rows immuta
-- could have written, and a configuration added by a role that is not a superuser is left out
-- with a WARNING. immuta's own writes pass straight through.
GRANT USAGE ON SCHEMA immuta TO @extowner@;
GRANT INSERT ON immuta.data_keys, immuta.key_usage, immuta.audit_log, immuta.config, immuta.keyrings TO @extowner@;
GRANT UPDATE ON SEQUENCE immuta.data_keys_id_seq, immuta.audit_log_id_seq TO @extowner@;
