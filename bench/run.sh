#!/usr/bin/env bash
# immuta benchmark: everything in one run, on one table of 1,000,000 rows of 96-character text,
# each query timed $RUNS times (default 7) inside the server (plpgsql, clock_timestamp around
# EXECUTE) and the median reported; a floor and the queries compared with it run in rounds (each
# round runs each of them once), so that the machine's drift during the run weighs on both alike:
#   - the floor, count(length(v)), and immuta_encrypt / immuta_decrypt over all rows: text without
#     and with a context, bigint and timestamptz (fixed-size types), numeric, and jsonb of about
#     1 kB (over $JSON_ROWS rows, scaled per row);
#   - 1 MiB values stored uncompressed: MiB/s of encryption and decryption net of detoasting,
#     against what `openssl speed -evp aes-256-gcm` does on the same machine;
#   - pgcrypto's encrypt()/decrypt() (raw AES, 32-byte key) over all rows, and pgp_sym_encrypt()
#     over 20,000 rows, scaled per row;
#   - the floor and immuta_decrypt in a parallel query with 2 workers;
#   - AWS KMS unwraps after a restart, with 8 connections decrypting values under 3 keys (moto's
#     KMS on loopback);
#   - online re-encryption of a column of $ROWS values (CALL immuta_reencrypt_column) against
#     the same batched walk running UPDATE ... SET c = c, same batch size;
#   - online encryption of a plaintext column of $ROWS values (CALL immuta_encrypt_column)
#     against ALTER TABLE ... TYPE bytea USING immuta_encrypt(v), each with an application session
#     updating rows meanwhile: the longest any one of its UPDATEs took;
#   - pgbench: INSERT of a row with an encrypted column against the same INSERT in plain text.
# One table and the targets go to stdout and to bench/results/latest.txt. Needs the extension
# installed and moto in .venv (`make bench` does both). Everything runs on this machine: a
# cluster in $BENCH_DIR on a Unix socket, moto on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
DIR=${BENCH_DIR:-/tmp/immuta-bench}
PORT=${BENCH_PORT:-5498}
ROWS=${BENCH_ROWS:-1000000}
PGP_ROWS=${BENCH_PGP_ROWS:-20000}
JSON_ROWS=${BENCH_JSON_ROWS:-100000}
BIG_ROWS=${BENCH_BIG_ROWS:-256}
RUNS=${RUNS:-7}
KEYRINGS=${BENCH_KEYRINGS:-10000}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-15}
OUT=bench/results/latest.txt
mkdir -p "$(dirname "$OUT")"
if [ "$(id -u)" = 0 ]; then AS_PG=(runuser -u postgres --); else AS_PG=(sudo -u postgres); fi
# The server's environment: nothing of ours, and an AWS SDK that never leaves loopback; and glibc's
# malloc told to keep freed memory up to 64 MiB instead of returning it to the system after each
# row. PostgreSQL allocates every chunk above 8 kB with malloc; with glibc's default (dynamic)
# thresholds, a function that holds a second 1 MiB allocation beside its detoasted argument gets
# it back from the kernel page by page on every row, whatever the function: PostgreSQL's own
# b || '\x00' pays the same (the "concatenation" row). Measured on this machine without it:
# 256 such calls took 0.34 s to 0.42 s, immuta's and the concatenation alike, against 0.09 s for
# the detoast floor (docs/PERFORMANCE.md). BENCH_GLIBC_TUNABLES= (empty) runs without it.
MALLOC_TUNABLES=${BENCH_GLIBC_TUNABLES-glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=33554432}
SERVER_ENV=(env -i PATH=/usr/local/bin:/usr/bin:/bin AWS_EC2_METADATA_DISABLED=true
            AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
            GLIBC_TUNABLES="$MALLOC_TUNABLES")
MOTO_PID=

stop() {
  "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  if [ -n "$MOTO_PID" ]; then kill "$MOTO_PID" 2>/dev/null || true; fi
}
# The cluster's data (gigabytes after the million-row rounds) goes at exit, the server log stays;
# BENCH_KEEP_DATA=1 keeps it for a look.
finish() {
  stop
  if [ -z "${BENCH_KEEP_DATA:-}" ]; then rm -rf "$DIR/data"; fi
}
trap finish EXIT

pg_start() { "${AS_PG[@]}" "${SERVER_ENV[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null; }
psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres "$@"; }

stop
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres: "$DIR"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$DIR/data" -E UTF8 --locale=C -A trust -U postgres >/dev/null
cat <<CONF | "${AS_PG[@]}" tee -a "$DIR/data/postgresql.conf" >/dev/null
listen_addresses = ''
unix_socket_directories = '$DIR'
port = $PORT
shared_preload_libraries = 'immuta'
shared_buffers = 4GB
fsync = off
synchronous_commit = off
jit = off
autovacuum = off
max_parallel_workers_per_gather = 0
max_worker_processes = 8
max_parallel_workers = 4
CONF
pg_start

# moto's KMS on a free loopback port, and one KMS key.
MOTO_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$DIR/moto.log" 2>&1 &
MOTO_PID=$!
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $MOTO_PORT), 0.2)" 2>/dev/null && break
  sleep 0.1
done
KMS_KEY=$(.venv/bin/python tests/kms/fixture.py "http://127.0.0.1:$MOTO_PORT" create-key)

echo "building $ROWS rows and their encrypted copies..." >&2
psql -d postgres <<SQL
CREATE EXTENSION immuta;
CREATE EXTENSION pgcrypto;
CREATE TABLE t AS SELECT left(repeat(md5(i::text), 3), 96) AS v FROM generate_series(1, $ROWS) i;
CREATE TABLE c AS SELECT immuta_encrypt(v) AS c FROM t;
CREATE TABLE pc AS SELECT encrypt(convert_to(v, 'UTF8'), '\\x$(printf 'ab%.0s' $(seq 32))'::bytea, 'aes') AS c FROM t;
CREATE TABLE tp AS SELECT v FROM t LIMIT $PGP_ROWS;
CREATE TABLE cx AS SELECT immuta_encrypt(v, 'public.patients.ssn:1234567') AS c FROM t;
CREATE TABLE tf AS SELECT i::int8 AS n, timestamptz '2024-01-01' + i * interval '1 second' AS ts,
                          (i * 1.2345)::numeric AS x FROM generate_series(1, $ROWS) i;
CREATE TABLE cf AS SELECT immuta_encrypt(n) AS n, immuta_encrypt(ts) AS ts, immuta_encrypt(x) AS x FROM tf;
CREATE TABLE tj AS SELECT (SELECT jsonb_object_agg('field_' || k, md5((i * k)::text)) FROM generate_series(1, 22) k) AS j
                   FROM generate_series(1, $JSON_ROWS) i;
CREATE TABLE cj AS SELECT immuta_encrypt(j) AS c FROM tj;
CREATE TABLE big (b bytea); ALTER TABLE big ALTER COLUMN b SET STORAGE EXTERNAL;
INSERT INTO big SELECT convert_to(repeat(md5(i::text), 32768), 'UTF8') FROM generate_series(1, $BIG_ROWS) i;
CREATE TABLE bigc (c bytea); ALTER TABLE bigc ALTER COLUMN c SET STORAGE EXTERNAL;
INSERT INTO bigc SELECT immuta_encrypt(b) FROM big;
-- Blind index (issue 16): the values, their ciphertexts and their terms, a btree on the terms.
SELECT immuta_blind_index_create('bench.v');
CREATE TABLE bi AS SELECT v, immuta_encrypt(v) AS c, immuta_blind_index(v, 'bench.v') AS term FROM t;
CREATE INDEX bi_term ON bi (term);
VACUUM (FREEZE, ANALYZE) bi;
-- Mean milliseconds of a lookup by term (200 of them) and of the sequential scan with
-- immuta_decrypt it replaces, and the rows each found.
CREATE FUNCTION bench_lookup() RETURNS text LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz; found_by_term int; found_by_scan int; lookup float8; scan float8; probe text;
BEGIN
  SELECT v INTO probe FROM bi OFFSET 123456 LIMIT 1;
  SELECT count(*) INTO found_by_term FROM bi WHERE term = immuta_blind_index(probe, 'bench.v');
  t0 := clock_timestamp();
  FOR i IN 1..200 LOOP
    SELECT count(*) INTO found_by_term FROM bi WHERE term = immuta_blind_index(probe, 'bench.v');
  END LOOP;
  lookup := extract(epoch FROM clock_timestamp() - t0) * 1000 / 200;
  t0 := clock_timestamp();
  SELECT count(*) INTO found_by_scan FROM bi WHERE immuta_decrypt(c) = probe;
  scan := extract(epoch FROM clock_timestamp() - t0) * 1000;
  RETURN format('%s %s %s %s', round(lookup::numeric, 3), round(scan::numeric, 1), found_by_term, found_by_scan);
END \$\$;
VACUUM (FREEZE, ANALYZE) t; VACUUM (FREEZE, ANALYZE) c; VACUUM (FREEZE, ANALYZE) pc; VACUUM (FREEZE, ANALYZE) tp;
VACUUM (FREEZE, ANALYZE) cx; VACUUM (FREEZE, ANALYZE) tf; VACUUM (FREEZE, ANALYZE) cf; VACUUM (FREEZE, ANALYZE) tj;
VACUUM (FREEZE, ANALYZE) cj; VACUUM (FREEZE, ANALYZE) big; VACUUM (FREEZE, ANALYZE) bigc;
-- Write the gigabyte just built out now: otherwise the checkpointer spreads it over the next
-- minutes, on the same two cores as the timed queries.
CHECKPOINT;
CREATE TABLE results (ord serial, label text PRIMARY KEY, seconds float8, rows int8);
-- Times the queries qs (labelled labels) in rounds: each round runs every query once, in order, so
-- that a drift of the machine's speed during the run (other tenants of the host, frequency)
-- weighs on the floor and on what is compared with it alike; the median of the rounds is kept.
CREATE FUNCTION bench_rounds(labels text[], qs text[], nrows int8, runs int) RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz;
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS times (round int, i int, t float8);
  TRUNCATE times;
  FOR j IN 1..array_length(qs, 1) LOOP
    EXECUTE qs[j];  -- warm-up: caches, the key ring
  END LOOP;
  FOR r IN 1..runs LOOP
    FOR j IN 1..array_length(qs, 1) LOOP
      t0 := clock_timestamp();
      EXECUTE qs[j];
      INSERT INTO times VALUES (r, j, extract(epoch FROM clock_timestamp() - t0));
    END LOOP;
  END LOOP;
  INSERT INTO results (label, seconds, rows)
  SELECT labels[i], percentile_cont(0.5) WITHIN GROUP (ORDER BY t), nrows FROM times GROUP BY i ORDER BY i;
END \$\$;
-- One query alone, its times kept in an array (pgp_sym_encrypt, timed over fewer rows).
CREATE FUNCTION bench(label text, q text, nrows int8, runs int) RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz; times float8[] := '{}';
BEGIN
  EXECUTE q;  -- warm-up: caches, the key ring
  FOR i IN 1..runs LOOP
    t0 := clock_timestamp();
    EXECUTE q;
    times := times || extract(epoch FROM clock_timestamp() - t0)::float8;
  END LOOP;
  INSERT INTO results (label, seconds, rows)
  SELECT label, percentile_cont(0.5) WITHIN GROUP (ORDER BY x), nrows FROM unnest(times) x;
END \$\$;
SQL

echo "timing the queries..." >&2
# Large values first, in a backend of their own (see MALLOC_TUNABLES above for what glibc's malloc
# does to them otherwise), in rounds with their detoast floors and PostgreSQL's own concatenation,
# which also holds a second 1 MiB allocation: the reference for what the allocator costs.
psql -d postgres >/dev/null <<SQL
SELECT bench_rounds(ARRAY[
  '1 MiB values: detoast floor',
  '1 MiB values: immuta_encrypt',
  '1 MiB values: concatenation b || ''\x00''',
  '1 MiB ciphertexts: detoast floor',
  '1 MiB values: immuta_decrypt_bytea'
], ARRAY[
  'SELECT count(get_byte(b, 0)) FROM big',
  'SELECT count(immuta_encrypt(b)) FROM big',
  \$q\$SELECT count(length(b || '\x00'::bytea)) FROM big\$q\$,
  'SELECT count(get_byte(c, 0)) FROM bigc',
  'SELECT count(immuta_decrypt_bytea(c)) FROM bigc'
], $BIG_ROWS, $RUNS);
SQL
KEY="'\\x$(printf 'ab%.0s' $(seq 32))'::bytea"
psql -d postgres >/dev/null <<SQL
-- The floor, immuta's functions on values of about 100 bytes and pgcrypto's, in rounds.
SELECT bench_rounds(ARRAY[
  'floor: count(length(v))',
  'immuta_encrypt(v)',
  'immuta_decrypt(c)',
  'immuta_encrypt(v, context)',
  'immuta_decrypt(c, context)',
  'immuta_encrypt(bigint)',
  'immuta_decrypt(c, NULL::bigint)',
  'immuta_encrypt(timestamptz)',
  'immuta_decrypt(c, NULL::timestamptz)',
  'immuta_encrypt(numeric)',
  'immuta_decrypt(c, NULL::numeric)',
  'pgcrypto encrypt(v, key, ''aes'')',
  'pgcrypto decrypt(c, key, ''aes'')',
  'immuta_blind_index(v, name)'
], ARRAY[
  'SELECT count(length(v)) FROM t',
  'SELECT count(immuta_encrypt(v)) FROM t',
  'SELECT count(immuta_decrypt(c)) FROM c',
  \$q\$SELECT count(immuta_encrypt(v, 'public.patients.ssn:1234567')) FROM t\$q\$,
  \$q\$SELECT count(immuta_decrypt(c, 'public.patients.ssn:1234567')) FROM cx\$q\$,
  'SELECT count(immuta_encrypt(n)) FROM tf',
  'SELECT count(immuta_decrypt(n, NULL::bigint)) FROM cf',
  'SELECT count(immuta_encrypt(ts)) FROM tf',
  'SELECT count(immuta_decrypt(ts, NULL::timestamptz)) FROM cf',
  'SELECT count(immuta_encrypt(x)) FROM tf',
  'SELECT count(immuta_decrypt(x, NULL::numeric)) FROM cf',
  \$q\$SELECT count(encrypt(convert_to(v, 'UTF8'), $KEY, 'aes')) FROM t\$q\$,
  \$q\$SELECT count(convert_from(decrypt(c, $KEY, 'aes'), 'UTF8')) FROM pc\$q\$,
  \$q\$SELECT count(immuta_blind_index(v, 'bench.v')) FROM t\$q\$
], $ROWS, $RUNS);
SELECT bench_rounds(ARRAY['jsonb of 1 kB: floor count(j)', 'immuta_encrypt(jsonb of 1 kB)', 'immuta_decrypt_jsonb(c), 1 kB'],
  ARRAY['SELECT count(j::text) FROM tj', 'SELECT count(immuta_encrypt(j)) FROM tj', 'SELECT count(immuta_decrypt_jsonb(c)) FROM cj'],
  $JSON_ROWS, $RUNS);
SELECT bench('pgcrypto pgp_sym_encrypt(v, pass)',
             \$q\$SELECT count(pgp_sym_encrypt(v, 'passphrase')) FROM tp\$q\$, $PGP_ROWS, 3);
-- Parallel: 2 workers, the leader only gathering.
SET max_parallel_workers_per_gather = 2;
SET parallel_leader_participation = off;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SELECT bench_rounds(ARRAY['parallel, 2 workers: floor', 'parallel, 2 workers: immuta_decrypt(c)', 'parallel, 2 workers: immuta_encrypt(v)'],
  ARRAY['SELECT count(length(v)) FROM t', 'SELECT count(immuta_decrypt(c)) FROM c', 'SELECT count(immuta_encrypt(v)) FROM t'],
  $ROWS, $RUNS);
SQL
echo "10,000 keyrings..." >&2
psql -d postgres >/dev/null <<SQL
-- A keyring per tenant: each row of tk belongs to one of 10,000 keyrings. The first pass creates
-- their keys (the warm-up); then rows under their own keyrings against the same rows under one.
-- Twice the rounds of the other figures: the many keyrings' query waits on memory (each row
-- reaches another key's entry and AES-GCM context), so the host's other tenants move it more
-- than the one keyring's; the target compares the two within each round (back to back) and
-- keeps the median of those ratios, as for the re-encryption below.
SELECT count(immuta_keyring_create('tenant_' || i)) FROM generate_series(0, $KEYRINGS - 1) i;
CREATE TABLE tk AS SELECT v, 'tenant_' || (row_number() OVER () % $KEYRINGS) AS tenant FROM t;
SELECT count(immuta_encrypt(v, keyring => tenant)) FROM tk;
SELECT bench_rounds(ARRAY['keyrings: floor count(length(v)), tk',
                          'keyrings: immuta_encrypt(v), one keyring',
                          'keyrings: immuta_encrypt(v, keyring => tenant), 10,000 keyrings'],
  ARRAY['SELECT count(length(v)) FROM tk',
        'SELECT count(immuta_encrypt(v)) FROM tk',
        'SELECT count(immuta_encrypt(v, keyring => tenant)) FROM tk'],
  $ROWS, 2 * $RUNS);
CREATE TABLE keyring_rounds AS
  SELECT round, o.t AS one, m.t AS many FROM times o JOIN times m USING (round) WHERE o.i = 2 AND m.i = 3;
SQL
KEYRING_RATIO=$(psql -d postgres -At -c "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY many / one) FROM keyring_rounds")
KEYRING_ROUNDS=$(psql -d postgres -At -c "SELECT string_agg(format('%s/%s', round(one::numeric, 2), round(many::numeric, 2)), ' ' ORDER BY round) FROM keyring_rounds")
PLAN=$(psql -d postgres -At -c "SET max_parallel_workers_per_gather = 2; SET parallel_leader_participation = off;
  SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
  EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT count(immuta_decrypt(c)) FROM c" | grep -E 'Workers (Planned|Launched)' | xargs)

echo "online re-encryption..." >&2
# A column of the $ROWS values moved to a new key by immuta_reencrypt_column, against the same
# batched walk running UPDATE ... SET c = c over a copy (same batch size, a commit per batch).
# Each round builds both tables afresh (the same values, then a rotation puts them all under an
# old key), each call starts after a checkpoint, and which goes first alternates; the
# median of seven rounds is kept (the batched UPDATE alone varies by a fifth from round to
# round on this machine). Procedures commit, so each call is its own psql command, timed by
# the server (clock_timestamp() around the CALL, in the session).
psql -d postgres >/dev/null <<SQL
CREATE PROCEDURE batched_update(tbl regclass, batch_size int) LANGUAGE plpgsql AS \$\$
DECLARE b bigint := 0; per_block bigint; step bigint; nblocks bigint;
BEGIN
  SELECT GREATEST(1, (reltuples / relpages)::bigint) INTO per_block FROM pg_class WHERE oid = tbl;
  step := GREATEST(1, batch_size / per_block);
  nblocks := pg_relation_size(tbl) / current_setting('block_size')::bigint;
  WHILE b < nblocks LOOP
    EXECUTE format('UPDATE %s SET c = c WHERE ctid >= %L::tid AND ctid < %L::tid', tbl,
                   format('(%s,0)', b), format('(%s,0)', b + step));
    COMMIT;
    b := b + step;
  END LOOP;
END \$\$;
CREATE TABLE reencrypt_times (round int, what text, seconds float8);
SQL
timed_call() {  # round, label, CALL statement: after a checkpoint, so that each starts alike
  # The checkpoint's writes (and the WAL of the steps before) are flushed by the kernel before
  # the call starts: on this virtual machine's disk, that writeback otherwise lands in the next
  # call, and a batched UPDATE took from 1.6 s to 6.3 s within one run.
  psql -d postgres -c CHECKPOINT >/dev/null
  sync
  psql -d postgres >/dev/null <<SQL
SELECT clock_timestamp() AS t0 \gset
$3;
INSERT INTO reencrypt_times VALUES ($1, '$2', extract(epoch FROM clock_timestamp() - :'t0'::timestamptz));
SQL
}
for round in 1 2 3 4 5 6 7; do
  # Two fresh tables of the same values under a key that is then rotated away.
  psql -d postgres >/dev/null -c "DROP TABLE IF EXISTS rc, ru" -c "CREATE TABLE rc AS SELECT immuta_encrypt(v) AS c FROM t" \
    -c "CREATE TABLE ru AS SELECT c FROM rc" -c "SELECT immuta_rotate()" -c "VACUUM ANALYZE rc, ru"
  # Alternating which goes first.
  if [ $((round % 2)) = 1 ]; then
    timed_call $round update "CALL batched_update('ru', 10000)"
    timed_call $round reencrypt "CALL immuta_reencrypt_column('rc', 'c', batch_size => 10000)"
  else
    timed_call $round reencrypt "CALL immuta_reencrypt_column('rc', 'c', batch_size => 10000)"
    timed_call $round update "CALL batched_update('ru', 10000)"
  fi
done
psql -d postgres >/dev/null <<SQL
INSERT INTO results (label, seconds, rows)
SELECT CASE what WHEN 'update' THEN 'batched UPDATE t SET c = c, 10,000 rows a batch'
                 ELSE 'CALL immuta_reencrypt_column, 10,000 rows a batch' END,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds), $ROWS
  FROM reencrypt_times GROUP BY what;
SQL
# The target compares the two within each round (they ran back to back, so a drift of the
# machine's speed between rounds weighs on both alike) and keeps the median of those ratios.
read -r BI_LOOKUP_MS BI_SCAN_MS BI_FOUND BI_SCAN_FOUND <<<"$(psql -d postgres -At -c 'SELECT bench_lookup()')"
REENC_RATIO=$(psql -d postgres -At -c "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY r.seconds / u.seconds)
  FROM reencrypt_times r JOIN reencrypt_times u USING (round) WHERE r.what = 'reencrypt' AND u.what = 'update'")
REENC_ROUNDS=$(psql -d postgres -At -c "SELECT string_agg(format('%s/%s', round(u.seconds::numeric, 2), round(r.seconds::numeric, 2)), ' ' ORDER BY round)
  FROM reencrypt_times r JOIN reencrypt_times u USING (round) WHERE r.what = 'reencrypt' AND u.what = 'update'")
LEFTOVER=$(psql -d postgres -At -c "SELECT count(*) FROM immuta_inventory('rc', 'c') WHERE NOT is_current")

echo "online encryption of a plaintext column..." >&2
# The $ROWS plaintexts of t, with an id, encrypted into a new bytea column online (CALL
# immuta_encrypt_column: its trigger, then batches), against the offline way on a copy (ALTER
# TABLE ... ALTER COLUMN ... TYPE bytea USING immuta_encrypt(v), one rewrite under an exclusive
# lock). During each, an application session updates a random row's plaintext every 10 ms, each
# UPDATE its own transaction, timed by the server: its longest UPDATE is the longest any single
# application write waited (for a batch's row lock, the trigger's creation, or the rewrite).
psql -d postgres >/dev/null <<SQL
DROP TABLE IF EXISTS rc, ru;
CREATE TABLE pe AS SELECT row_number() OVER () AS id, v FROM t;
ALTER TABLE pe ADD PRIMARY KEY (id);
CREATE TABLE po AS SELECT * FROM pe;
ALTER TABLE po ADD PRIMARY KEY (id);
ALTER TABLE pe ADD COLUMN c bytea;
VACUUM ANALYZE pe, po;
CREATE TABLE app_stop (stop bool);
CREATE TABLE app_writes (what text, updates int, longest float8, mean float8);
CREATE PROCEDURE app_writer(what text, tbl regclass, n bigint) LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz; d float8; longest float8 := 0; total float8 := 0; k int := 0;
BEGIN
  LOOP
    EXIT WHEN (SELECT stop FROM app_stop);
    t0 := clock_timestamp();
    EXECUTE format('UPDATE %s SET v = v WHERE id = \$1', tbl) USING 1 + floor(random() * n)::bigint;
    COMMIT;
    d := extract(epoch FROM clock_timestamp() - t0);
    longest := greatest(longest, d); total := total + d; k := k + 1;
    PERFORM pg_sleep(0.01);
  END LOOP;
  INSERT INTO app_writes VALUES (what, k, longest, total / greatest(k, 1));
END \$\$;
SQL
with_app_writer() {  # label, table, CALL or ALTER statement timed as timed_call does
  psql -d postgres >/dev/null -c "DELETE FROM app_stop" -c "INSERT INTO app_stop VALUES (false)"
  psql -d postgres >/dev/null -c "CALL app_writer('$1', '$2', $ROWS)" &
  local writer=$!
  # The writer's first updates before the statement starts.
  sleep 1
  timed_call 0 "$1" "$3"
  sleep 1
  psql -d postgres >/dev/null -c "UPDATE app_stop SET stop = true"
  wait "$writer"
}
with_app_writer encrypt_online pe "CALL immuta_encrypt_column('pe', 'v', 'c', batch_size => 10000)"
with_app_writer encrypt_offline po "ALTER TABLE po ALTER COLUMN v TYPE bytea USING immuta_encrypt(v)"
psql -d postgres >/dev/null <<SQL
INSERT INTO results (label, seconds, rows)
SELECT CASE what WHEN 'encrypt_online' THEN 'CALL immuta_encrypt_column (online), 10,000 rows a batch'
                 ELSE 'ALTER TABLE ... TYPE bytea USING immuta_encrypt(v) (offline)' END, seconds, $ROWS
  FROM reencrypt_times WHERE what LIKE 'encrypt_%';
SQL
ENCRYPTED_ONLINE=$(psql -d postgres -At -c "SELECT count(*) FROM pe WHERE c IS NULL OR immuta_decrypt(c) <> v")
APP_WRITES=$(psql -d postgres -At -F ' ' -c "SELECT what, updates, round(longest::numeric * 1000, 1), round(mean::numeric * 1000, 2) FROM app_writes ORDER BY what" \
  | awk '{printf "%s%s: %s updates, longest %s ms, mean %s ms", (NR > 1 ? "; " : ""), $1, $2, $3, $4}')
psql -d postgres >/dev/null -c "DROP TABLE pe, po"

echo "AWS KMS: values under 3 keys, a restart, 8 connections..." >&2
psql -d postgres -c "CREATE DATABASE kms"
YAML="plugins:
  awsKms:
    plugin: awsKms
    isKms: true
    keyId: $KMS_KEY
    region: us-east-1
    extraKmsConfig:
      endpoint: http://127.0.0.1:$MOTO_PORT
      credentials: {accessKeyId: testing, secretAccessKey: testing}"
psql -d kms -v yaml="$YAML" <<'SQL' 2>/dev/null
CREATE EXTENSION immuta;
SELECT immuta_configure(:'yaml') \g /dev/null
CREATE TABLE kv AS SELECT immuta_encrypt('first ' || i) AS c FROM generate_series(1, 1000) i;
SELECT immuta_rotate() \g /dev/null
INSERT INTO kv SELECT immuta_encrypt('second ' || i) FROM generate_series(1, 1000) i;
SELECT immuta_rotate() \g /dev/null
INSERT INTO kv SELECT immuta_encrypt('third ' || i) FROM generate_series(1, 1000) i;
SQL
"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
pg_start
READERS=()
for _ in $(seq 8); do psql -d kms -At -c "SELECT count(immuta_decrypt(c)) FROM kv" >/dev/null & READERS+=($!); done
wait "${READERS[@]}"
KEYS_IN_USE=$(psql -d kms -At -c "SELECT count(DISTINCT immuta_key_id(c)) FROM kv")
KMS_UNWRAPS=$(psql -d kms -At -c "SELECT immuta_cache_stats()->>'kms_unwraps'")

echo "pgbench: INSERT plain and encrypted mixed in one run, ${PGBENCH_SECONDS}s, three rounds..." >&2
psql -d postgres -c "CREATE TABLE pb_plain (id int, v text); CREATE TABLE pb_encrypted (id int, v bytea)"
# Both scripts in one pgbench run, each transaction choosing one at random (weights 1:1), so that
# the machine's drift weighs on both alike (two 15 s runs one after the other measured 0.88x to
# 1.08x of each other for the same work); the latency of a sample of 2% of the transactions is
# logged (logging every one would add the same cost to both), and each script's mean latency in
# microseconds is printed. At the same concurrency, the ratio of the
# mean latencies is the ratio of the throughputs.
pgbench_latencies() {
  rm -f "$DIR"/pgbench_log.*
  "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared -c 2 -j 2 -T "$PGBENCH_SECONDS" \
    -f bench/pgbench_plain.sql@1 -f bench/pgbench_encrypted.sql@1 -l --sampling-rate=0.02 --log-prefix="$DIR/pgbench_log" postgres >/dev/null 2>&1
  # Log lines: client, transaction, latency (us), script (0 plain, 1 encrypted), epoch, us.
  cat "$DIR"/pgbench_log.* | awk '{ n[$4]++; t[$4] += $3 } END { printf "%.2f %.2f", t[0] / n[0], t[1] / n[1] }'
}
PLAIN=(); ENCRYPTED=()
for _ in 1 2 3; do
  read -r plain encrypted <<<"$(pgbench_latencies)"
  PLAIN+=("$plain"); ENCRYPTED+=("$encrypted")
done
PLAIN_CSV=$(IFS=,; echo "${PLAIN[*]}"); ENCRYPTED_CSV=$(IFS=,; echo "${ENCRYPTED[*]}")

# AES-256-GCM as OpenSSL does it on this machine, on 1 MiB buffers: the reference for large values.
OPENSSL_MIBS=$(openssl speed -seconds 3 -evp aes-256-gcm -bytes 1048576 2>/dev/null \
  | awk '/^(aes-256-gcm|AES-256-GCM)/ {v = $NF; sub(/k$/, "", v); printf "%.0f", v * 1000 / 1048576}')

{
  echo "immuta benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $ROWS rows of 96-character text, median of $RUNS runs"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')"
  echo "server: GLIBC_TUNABLES=${MALLOC_TUNABLES:-(none)}"
  echo
  psql -d postgres -P footer=off <<SQL
WITH r AS (SELECT ord, label, seconds * $ROWS / rows AS s FROM results),
     base AS (SELECT (SELECT s FROM r WHERE label = 'floor: count(length(v))') AS floor,
                  (SELECT s FROM r WHERE label LIKE 'pgcrypto encrypt%') AS pe,
                     (SELECT s FROM r WHERE label LIKE 'pgcrypto decrypt%') AS pd,
                     (SELECT s FROM r WHERE label LIKE 'pgcrypto pgp%') AS pp)
SELECT r.label AS "query (seconds for $ROWS rows)",
       round(r.s::numeric, 3) AS seconds,
       round((r.s * 1e9 / $ROWS)::numeric) AS ns_per_row,
       round((r.s / floor)::numeric, 2) AS x_floor,
       round((pe / r.s)::numeric, 1) AS faster_than_pgcrypto_encrypt,
       round((pd / r.s)::numeric, 1) AS faster_than_pgcrypto_decrypt,
       round((pp / r.s)::numeric, 0) AS faster_than_pgp_sym_encrypt
FROM r, base ORDER BY r.ord;
SQL
  echo "pgp_sym_encrypt was timed over $PGP_ROWS rows, jsonb over $JSON_ROWS, 1 MiB values over $BIG_ROWS; all scaled to $ROWS."
  psql -d postgres -At <<SQL
WITH r AS (SELECT label, seconds / rows AS per_value FROM results)
SELECT format('1 MiB values, net of detoasting: encrypt %s MiB/s, decrypt %s MiB/s; openssl speed -evp aes-256-gcm: $OPENSSL_MIBS MiB/s',
              round(1 / ((SELECT per_value FROM r WHERE label = '1 MiB values: immuta_encrypt') - (SELECT per_value FROM r WHERE label = '1 MiB values: detoast floor'))),
              round(1 / ((SELECT per_value FROM r WHERE label = '1 MiB values: immuta_decrypt_bytea') - (SELECT per_value FROM r WHERE label = '1 MiB ciphertexts: detoast floor'))));
SQL
  echo "parallel plan: $PLAN"
  echo
  echo "AWS KMS after a restart, 8 connections decrypting values under $KEYS_IN_USE keys: $KMS_UNWRAPS KMS unwraps"
  echo "blind index lookup in a table of $ROWS rows: ${BI_LOOKUP_MS} ms by term (index scan, $BI_FOUND row), ${BI_SCAN_MS} ms by sequential scan with immuta_decrypt ($BI_SCAN_FOUND row)"
  echo "10,000 keyrings, each round's one keyring / 10,000 keyrings in seconds: $KEYRING_ROUNDS"
  echo "online re-encryption, each round's batched UPDATE / CALL immuta_reencrypt_column in seconds: $REENC_ROUNDS"
  echo "plaintext column encrypted online while an application updates a random row every 10 ms (server-timed UPDATEs; rows not matching their plaintext after the online run: $ENCRYPTED_ONLINE): $APP_WRITES"
  echo "pgbench INSERT mean latency in us (2 clients, plain and encrypted mixed, ${PGBENCH_SECONDS}s, three rounds, compared by median): plain ${PLAIN[*]}; encrypted ${ENCRYPTED[*]}"
  echo
  psql -d postgres -At <<SQL
WITH r AS (SELECT label, seconds * $ROWS / rows AS s FROM results),
     v AS (SELECT (SELECT s FROM r WHERE label = 'floor: count(length(v))') AS floor,
                  (SELECT s FROM r WHERE label = 'immuta_encrypt(v)') AS enc,
                  (SELECT s FROM r WHERE label = 'immuta_decrypt(c)') AS dec,
                  (SELECT s FROM r WHERE label = 'immuta_encrypt(v, context)') AS enc_ctx,
                  (SELECT s FROM r WHERE label = 'immuta_decrypt(c, context)') AS dec_ctx,
                  (SELECT s FROM r WHERE label = 'immuta_blind_index(v, name)') AS bi,
                  (SELECT max(s) FROM r WHERE label IN ('immuta_encrypt(bigint)', 'immuta_encrypt(timestamptz)')) AS enc_fixed,
                  (SELECT max(s) FROM r WHERE label IN ('immuta_decrypt(c, NULL::bigint)', 'immuta_decrypt(c, NULL::timestamptz)')) AS dec_fixed,
                  (SELECT $ROWS / ((SELECT s FROM r WHERE label = '1 MiB values: immuta_encrypt') - (SELECT s FROM r WHERE label = '1 MiB values: detoast floor'))) AS enc_big,
                  (SELECT $ROWS / ((SELECT s FROM r WHERE label = '1 MiB values: immuta_decrypt_bytea') - (SELECT s FROM r WHERE label = '1 MiB ciphertexts: detoast floor'))) AS dec_big,
                  (SELECT s FROM r WHERE label = 'keyrings: immuta_encrypt(v), one keyring') AS enc_one,
                  (SELECT s FROM r WHERE label LIKE 'keyrings: immuta_encrypt(v, keyring => tenant)%') AS enc_many,
                  (SELECT s FROM r WHERE label LIKE 'batched UPDATE%') AS upd,
                  (SELECT s FROM r WHERE label LIKE 'CALL immuta_reencrypt_column%') AS reenc,
                  (SELECT s FROM r WHERE label LIKE 'pgcrypto encrypt%') AS pe,
                  (SELECT s FROM r WHERE label LIKE 'pgcrypto decrypt%') AS pd,
                  (SELECT s FROM r WHERE label LIKE 'pgcrypto pgp%') AS pp,
                  (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM unnest('{$PLAIN_CSV}'::float8[]) x) AS plain_us,
                  (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM unnest('{$ENCRYPTED_CSV}'::float8[]) x) AS enc_us)
SELECT format('%-58s %-10s %s', target, CASE WHEN ok THEN 'met' ELSE 'MISSED' END, measured) FROM v, LATERAL (VALUES
  ('immuta_encrypt(text) at most 1.2x the floor', enc / floor <= 1.2, round((enc / floor)::numeric, 2) || 'x'),
  ('immuta_decrypt(text) at most 1.2x the floor', dec / floor <= 1.2, round((dec / floor)::numeric, 2) || 'x'),
  ('immuta_encrypt with a context at most 1.4x the floor', enc_ctx / floor <= 1.4, round((enc_ctx / floor)::numeric, 2) || 'x'),
  ('immuta_decrypt with a context at most 1.4x the floor', dec_ctx / floor <= 1.4, round((dec_ctx / floor)::numeric, 2) || 'x'),
  ('immuta_encrypt of bigint, timestamptz at most 1.4x the floor', enc_fixed / floor <= 1.4, round((enc_fixed / floor)::numeric, 2) || 'x'),
  ('immuta_decrypt of bigint, timestamptz at most 1.4x the floor', dec_fixed / floor <= 1.4, round((dec_fixed / floor)::numeric, 2) || 'x'),
  ('immuta_blind_index at most 1.3x the floor', bi / floor <= 1.3, round((bi / floor)::numeric, 2) || 'x'),
  ('blind index lookup in $ROWS rows under 1 ms (index scan)', $BI_LOOKUP_MS < 1 AND '$BI_FOUND' = '1', '$BI_LOOKUP_MS ms, against $BI_SCAN_MS ms by sequential scan with immuta_decrypt'),
  ('encrypt under 10,000 keyrings at most 2x one keyring', $KEYRING_RATIO <= 2, round($KEYRING_RATIO::numeric, 2) || 'x (median of the rounds'' ratios; of the medians: ' || round((enc_many / enc_one)::numeric, 2) || 'x)'),
  ('online re-encryption at most 1.5x a batched UPDATE', $REENC_RATIO <= 1.5 AND '$LEFTOVER' = '0', round($REENC_RATIO::numeric, 2) || 'x (median of the rounds'' ratios), keys left behind: $LEFTOVER'),
  ('1 MiB encrypt at least 0.7x openssl aes-256-gcm ($OPENSSL_MIBS MiB/s)', enc_big >= 0.7 * $OPENSSL_MIBS, round(enc_big::numeric) || ' MiB/s, ' || round((enc_big / $OPENSSL_MIBS)::numeric, 2) || 'x'),
  ('1 MiB decrypt at least 0.7x openssl aes-256-gcm ($OPENSSL_MIBS MiB/s)', dec_big >= 0.7 * $OPENSSL_MIBS, round(dec_big::numeric) || ' MiB/s, ' || round((dec_big / $OPENSSL_MIBS)::numeric, 2) || 'x'),
  ('immuta_encrypt at least 2.5x faster than pgcrypto encrypt()', pe / enc >= 2.5, round((pe / enc)::numeric, 1) || 'x'),
  ('immuta_decrypt at least 2.5x faster than pgcrypto decrypt()', pd / dec >= 2.5, round((pd / dec)::numeric, 1) || 'x'),
  ('immuta_encrypt at least 200x faster than pgp_sym_encrypt', pp / enc >= 200, round((pp / enc)::numeric) || 'x'),
  ('KMS unwraps after restart = keys in use ($KEYS_IN_USE)', '$KMS_UNWRAPS' = '$KEYS_IN_USE', '$KMS_UNWRAPS unwraps'),
  ('pgbench INSERT encrypted at least 0.9x plain tps', plain_us / enc_us >= 0.9, round((plain_us / enc_us)::numeric, 3) || 'x')
) t(target, ok, measured);
SQL
} | tee "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "written to $OUT"
