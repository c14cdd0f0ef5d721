#!/usr/bin/env bash
# immuta benchmark: per-row cost of immuta_encrypt / immuta_decrypt against the function-call
# floor, on one table of 1,000,000 rows of 96-character text, in one run. Each query runs
# $RUNS times (default 5) inside the server (plpgsql, clock_timestamp around EXECUTE) and the
# median is reported. Needs the extension installed (`make bench` does that).
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
DIR=${BENCH_DIR:-/tmp/immuta-bench}
PORT=${BENCH_PORT:-5498}
ROWS=${BENCH_ROWS:-1000000}
RUNS=${RUNS:-5}
OUT=bench/results/latest.txt
if [ "$(id -u)" = 0 ]; then AS_PG=(runuser -u postgres --); else AS_PG=(sudo -u postgres); fi

stop() { "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true; }
trap stop EXIT

stop
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres: "$DIR"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$DIR/data" -E UTF8 --locale=C -A trust -U postgres >/dev/null
{
  cat pgrx-config/postgresql.demo.conf
  echo "unix_socket_directories = '$DIR'"; echo "port = $PORT"
  echo "shared_buffers = 1GB"; echo "fsync = off"; echo "synchronous_commit = off"
  echo "max_parallel_workers_per_gather = 0"; echo "jit = off"
} | "${AS_PG[@]}" tee -a "$DIR/data/postgresql.conf" >/dev/null
"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null

psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres "$@"; }

psql <<SQL
CREATE EXTENSION immuta;
CREATE TABLE t AS SELECT left(repeat(md5(i::text), 3), 96) AS v FROM generate_series(1, $ROWS) i;
CREATE TABLE c AS SELECT immuta_encrypt(v) AS c FROM t;
VACUUM (FREEZE, ANALYZE) t; VACUUM (FREEZE, ANALYZE) c;
CREATE FUNCTION bench(name text, q text, runs int) RETURNS TABLE (label text, median_s float8)
LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz; times float8[] := '{}';
BEGIN
  EXECUTE q;  -- warm-up: caches, the key ring
  FOR i IN 1..runs LOOP
    t0 := clock_timestamp();
    EXECUTE q;
    times := times || extract(epoch FROM clock_timestamp() - t0)::float8;
  END LOOP;
  RETURN QUERY SELECT name, percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM unnest(times) x;
END \$\$;
SQL

{
  echo "immuta benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $ROWS rows of 96-character text, median of $RUNS runs"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')"
  echo
  psql -P footer=off <<SQL
WITH r AS (
  SELECT * FROM bench('floor: count(length(v))',     'SELECT count(length(v)) FROM t', $RUNS)
  UNION ALL SELECT * FROM bench('immuta_encrypt(v)', 'SELECT count(immuta_encrypt(v)) FROM t', $RUNS)
  UNION ALL SELECT * FROM bench('immuta_decrypt(c)', 'SELECT count(immuta_decrypt(c)) FROM c', $RUNS)
)
SELECT label AS query,
       round(median_s::numeric, 3) AS seconds,
       round((median_s / (SELECT median_s FROM r WHERE label LIKE 'floor%'))::numeric, 2) AS ratio_to_floor,
       round((median_s * 1e9 / $ROWS)::numeric) AS ns_per_row
FROM r;
SQL
} | tee "$OUT.tmp"
mkdir -p "$(dirname "$OUT")"; mv "$OUT.tmp" "$OUT"
echo "written to $OUT"
