-- immuta bootstrap: the internal schema and its tables, created before any function.
--
-- CREATE SCHEMA without IF NOT EXISTS on purpose: immuta must own the schema that holds its
-- keys, and must not adopt one that somebody else created beforehand.
CREATE SCHEMA immuta;
COMMENT ON SCHEMA immuta IS 'immuta internals: data keys (wrapped), configuration';

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
    reason           text NOT NULL CHECK (reason IN ('first use', 'manual', 'rollover')),
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

-- The configuration stored by immuta_configure(): one row of YAML.
CREATE TABLE immuta.config (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    yaml       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE immuta.config IS 'immuta configuration (Immuta Advanced Configuration YAML), set by immuta_configure()';
