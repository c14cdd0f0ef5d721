-- The `make demo` walkthrough: encrypt, decrypt, rotate, an old value still decrypting, roles,
-- status, the audit log and scheduled rollover.
\set ON_ERROR_STOP on
\pset footer off
DROP DATABASE IF EXISTS immuta_demo;
CREATE DATABASE immuta_demo;
\c immuta_demo
\echo
\echo '== 1. Install immuta and encrypt a column'
CREATE EXTENSION immuta;
CREATE TABLE patients (id int PRIMARY KEY, name text, ssn_enc bytea);
INSERT INTO patients VALUES
    (1, 'Ada',   immuta_encrypt('123-45-6789')),
    (2, 'Grace', immuta_encrypt('987-65-4321'));
\echo 'What the table holds (37 bytes of overhead: version, key id, nonce, tag):'
SELECT id, name, length(ssn_enc) AS bytes, immuta_key_id(ssn_enc) AS key_id,
       left(encode(ssn_enc, 'hex'), 40) || '...' AS ssn_enc
FROM patients ORDER BY id;
\echo 'Decrypted:'
SELECT id, name, immuta_decrypt(ssn_enc) AS ssn FROM patients ORDER BY id;

\echo
\echo '== 2. Rotate: a new data key encrypts from now on'
SELECT immuta_rotate() AS new_key_id;
INSERT INTO patients VALUES (3, 'Linus', immuta_encrypt('555-12-3456'));
\echo 'Old rows keep their key and still decrypt; the new row uses the new key:'
SELECT id, name, immuta_key_id(ssn_enc) AS key_id, immuta_decrypt(ssn_enc) AS ssn FROM patients ORDER BY id;

\echo
\echo '== 3. Configuration (Immuta YAML) and the keys, stored only wrapped by the master key'
SELECT immuta_configure(E'schedule:\n  dataKeyRollOverLength: 90\n') AS configured;
SELECT id, created_at::timestamp(0) AS created_at, provider, wrapping_key, reason, is_current,
       rollover_due_at::timestamp(0) AS rollover_due_at
FROM immuta.keys ORDER BY id;

\echo 'The key cache (shared across the cluster, since the demo preloads immuta):'
SELECT immuta_cache_stats();

\echo
\echo '== 4. Bad input gets a specific error, never a crash'
\set ON_ERROR_STOP off
SELECT immuta_decrypt('\x0102'::bytea);
SELECT immuta_decrypt(set_byte(ssn_enc, 30, get_byte(ssn_enc, 30) # 1)) FROM patients WHERE id = 1;

\echo
\echo '== 5. Roles: an ingest job that may encrypt but not decrypt'
DROP ROLE IF EXISTS ingest_demo;
CREATE ROLE ingest_demo;
GRANT immuta_encryptor TO ingest_demo;
GRANT SELECT, INSERT ON patients TO ingest_demo;
SET ROLE ingest_demo;
INSERT INTO patients VALUES (4, 'Barbara', immuta_encrypt('222-33-4444'));
SELECT immuta_decrypt(ssn_enc) FROM patients WHERE id = 4;
SELECT * FROM immuta.data_keys;
RESET ROLE;
\set ON_ERROR_STOP on

\echo
\echo '== 6. Key status, usage and the audit log'
SELECT jsonb_pretty(immuta_status() - 'rotation_job_error') AS status;
SELECT id, reason, encryptions, max_encryptions FROM immuta.keys ORDER BY id;
SELECT id, at::timestamp(0) AS at, event, key_id, reason, role FROM immuta.audit_log ORDER BY id;

\echo
\echo '== 7. Scheduled rollover with pg_cron (the demo preloads it; its jobs live in database postgres)'
SELECT current_setting('cron.database_name', true) IS NOT NULL AS has_cron \gset
\if :has_cron
\c postgres
CREATE EXTENSION IF NOT EXISTS pg_cron;
\c immuta_demo
SELECT immuta_schedule_rotation('0 3 * * *') AS job_id;
SELECT immuta_status()->'rotation_job' AS rotation_job;
\echo 'Each night at 03:00 the job runs pg_catalog.immuta_rotation_job(), that is immuta_rotate_if_due(); run it by hand (nothing is due yet):'
SELECT immuta_rotate_if_due() AS new_key_id;
\else
\echo 'pg_cron is not loaded in this demo cluster (it predates this walkthrough): make demo-stop, then make demo.'
\endif

\echo
\echo '== 8. A keyring per tenant, key states, and crypto-shredding a tenant'
-- Names of this run (a destroyed keyring's name stays taken, so a second run needs new ones).
SELECT 'acme_' || to_char(clock_timestamp(), 'YYYYMMDDHH24MISS') AS acme,
       'globex_' || to_char(clock_timestamp(), 'YYYYMMDDHH24MISS') AS globex \gset
SELECT immuta_keyring_create(:'acme'), immuta_keyring_create(:'globex');
DROP TABLE IF EXISTS orders;
CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, card bytea);
INSERT INTO orders VALUES (1, :'acme', NULL), (2, :'globex', NULL), (3, :'acme', NULL);
UPDATE orders SET card = immuta_encrypt('4111-0000-0000-000' || id, keyring => tenant);
SELECT o.id, o.tenant, k.state, immuta_decrypt(o.card) AS card
  FROM orders o JOIN immuta.keys k ON k.id = immuta_key_id(o.card) ORDER BY o.id;
\echo 'Acme leaves: its keyring is destroyed (crypto-shredding); globex keeps working.'
SELECT immuta_keyring_destroy(:'acme', 'customer left, ticket DEMO-1') AS keys_destroyed;
\set ON_ERROR_STOP off
SELECT immuta_decrypt(card) FROM orders WHERE tenant = :'acme';
\set ON_ERROR_STOP on
SELECT immuta_decrypt(card) AS globex_card FROM orders WHERE tenant = :'globex';
SELECT id, keyring, state, state_changed_by FROM immuta.keys WHERE keyring IN (:'acme', :'globex') ORDER BY id;
SELECT event, key_id, detail->>'reason' AS reason FROM immuta.audit_log WHERE keyring = :'acme' ORDER BY id;

\echo
\echo '== 9. Data under old keys: take stock, re-encrypt online, retire the key'
DROP TABLE IF EXISTS visits, visit_notes;
CREATE TABLE visits (id int PRIMARY KEY, ssn bytea, ctx text NOT NULL);
INSERT INTO visits SELECT i, immuta_encrypt('123-45-' || lpad(i::text, 4, '0'), 'visits:' || i), 'visits:' || i
  FROM generate_series(1, 5000) i;
CREATE TABLE visit_notes (id int PRIMARY KEY, note bytea);
INSERT INTO visit_notes SELECT i, immuta_encrypt('note ' || i) FROM generate_series(1, 40) i;
\echo 'visit_notes is written by an application, not by a job: register its column, so that key destruction checks it.'
SELECT immuta_register_column('visit_notes', 'note');
SELECT immuta_key_id(ssn) AS old_key FROM visits LIMIT 1 \gset
SELECT immuta_rotate() AS new_key;
\echo 'Every value is still under the old key:'
SELECT * FROM immuta_inventory('visits', 'ssn');
\echo 'Move them online, 1,000 rows a transaction (each value keeps its context, from the column ctx):'
CALL immuta_reencrypt_column('visits', 'ssn', context_column => 'ctx', batch_size => 1000);
SELECT table_name, column_name, passes, rows_done, rows_left, state FROM immuta.jobs_progress ORDER BY id DESC LIMIT 1;
SELECT * FROM immuta_inventory('visits', 'ssn');
\echo 'Nothing left under the old key in this table: once every column is checked, it can be retired.'
SELECT count(*) AS still_under_old_key FROM visits WHERE immuta_key_id(ssn) = :old_key;
SELECT immuta_decrypt(ssn, ctx) AS first_ssn FROM visits WHERE id = 1;
\echo 'Every registered column, counted for the old key (the job registered visits.ssn):'
SELECT * FROM immuta_key_references(:old_key) WHERE table_name::text LIKE 'visit%';
\echo 'Destroying the old key now would leave visit_notes unreadable: refused, naming it (tried in a transaction, rolled back).'
BEGIN;
SELECT immuta_key_disable(:old_key, 'walkthrough') AS disabled;
\set ON_ERROR_STOP off
SELECT immuta_key_destroy(:old_key, 'walkthrough');
\set ON_ERROR_STOP on
ROLLBACK;
\echo 'Re-encrypt that column too; then every count is zero, and disable + destroy would go through.'
CALL immuta_reencrypt_column('visit_notes', 'note');
SELECT * FROM immuta_key_references(:old_key) WHERE table_name::text LIKE 'visit%';

\echo
\echo '== 10. Encrypt a plaintext column online'
DROP TABLE IF EXISTS members;
CREATE TABLE members (id int PRIMARY KEY, email text NOT NULL, born date);
INSERT INTO members SELECT i, 'member' || i || '@example.com', date '1960-01-01' + i * 7 FROM generate_series(1, 3000) i;
\echo 'A new bytea column (no rewrite), then the job: a trigger for the writes that arrive, batches for the rows there.'
ALTER TABLE members ADD COLUMN email_enc bytea, ADD COLUMN born_enc bytea;
CALL immuta_encrypt_column('members', 'email', 'email_enc', context_column => 'id', batch_size => 1000);
CALL immuta_encrypt_column('members', 'born', 'born_enc', batch_size => 1000);
\echo 'A row written meanwhile (or afterwards) is encrypted by the trigger:'
INSERT INTO members (id, email, born) VALUES (9001, 'late@example.com', '1999-09-09');
SELECT id, immuta_decrypt(email_enc, id::text) AS email, immuta_decrypt(born_enc, NULL::date) AS born
  FROM members WHERE id IN (1, 9001) ORDER BY id;
\echo 'Once the application uses the encrypted columns: drop the triggers and the plaintext, then rewrite the table.'
DROP TRIGGER immuta_encrypt_email_enc ON members;
DROP TRIGGER immuta_encrypt_born_enc ON members;
ALTER TABLE members DROP COLUMN email, DROP COLUMN born;
VACUUM FULL members;
SELECT count(*) AS members, count(*) FILTER (WHERE immuta_decrypt(email_enc, id::text) LIKE '%@example.com') AS readable FROM members;
