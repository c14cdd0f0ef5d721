-- pgbench: INSERT of a row with a 96-character text column, in plain text (bench/run.sh).
\set id random(1, 1000000000)
INSERT INTO pb_plain VALUES (:id, md5(:id::text) || md5((:id + 1)::text) || md5((:id + 2)::text));
