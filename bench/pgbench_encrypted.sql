-- pgbench: the same INSERT with the column encrypted by immuta (bench/run.sh).
\set id random(1, 1000000000)
INSERT INTO pb_encrypted VALUES (:id, immuta_encrypt(md5(:id::text) || md5((:id + 1)::text) || md5((:id + 2)::text)));
