//! A million random and mutated ciphertexts through `immuta_decrypt` in a real server: each is
//! the original plaintext (only when the bytes are unchanged) or a documented SQLSTATE; no
//! crash, no wrong plaintext. The originals are text without and with a context, jsonb, and
//! bigint arrays with a context, each decrypted the way it was encrypted; the mutations change
//! versions, flags, types, key ids and every other byte. (The unit tier feeds another million to
//! the decoder directly.)

mod support;

use support::*;

const FUZZ: &str = r#"
CREATE FUNCTION fuzz(n int) RETURNS TABLE (outcome text, hits bigint) LANGUAGE plpgsql AS $$
DECLARE
    plains text[];
    kinds text[];
    ctxs text[];
    cts bytea[];
    total int;
    j int;
    m bytea;
    pos int;
    res text;
    state text;
    counts int[] := array_fill(0, ARRAY[10]);
    names text[] := ARRAY['original', 'WRONG PLAINTEXT', '22P03', '0A000', '42704', '22000', '22021', '42804', '22023', 'other'];
    others text := '';
BEGIN
    SELECT array_agg(plain ORDER BY id), array_agg(kind ORDER BY id), array_agg(ctx ORDER BY id), array_agg(c ORDER BY id)
        INTO plains, kinds, ctxs, cts FROM originals;
    total := array_length(cts, 1);
    FOR i IN 1..n LOOP
        j := 1 + (i % total);
        m := cts[j];
        pos := floor(random() * length(m))::int;
        CASE floor(random() * 8)::int
            WHEN 0 THEN m := set_byte(m, pos, get_byte(m, pos) # (1 << floor(random() * 8)::int));
            WHEN 1 THEN m := substring(m FROM 1 FOR pos);
            WHEN 2 THEN m := m || decode(md5(random()::text), 'hex');
            WHEN 3 THEN m := overlay(m PLACING int8send(floor(random() * 4)::int8) FROM 2 + 2 * floor(random() * 2)::int);
            WHEN 4 THEN m := set_byte(m, floor(random() * 3)::int, floor(random() * 4)::int);
            WHEN 5 THEN m := decode(repeat(md5(random()::text), 1 + pos % 4), 'hex');
            WHEN 6 THEN m := set_byte(set_byte(m, pos, floor(random() * 256)::int),
                                      floor(random() * length(m))::int, floor(random() * 256)::int);
            ELSE NULL; -- unchanged
        END CASE;
        BEGIN
            res := CASE kinds[j]
                WHEN 'text' THEN immuta_decrypt(m)
                WHEN 'text in context' THEN immuta_decrypt(m, ctxs[j])
                WHEN 'jsonb' THEN immuta_decrypt(m, NULL::jsonb)::text
                ELSE immuta_decrypt(m, NULL::bigint[], ctxs[j])::text
            END;
            IF m = cts[j] AND res = plains[j] THEN
                counts[1] := counts[1] + 1;
            ELSE
                counts[2] := counts[2] + 1;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            state := SQLSTATE;
            IF m = cts[j] THEN
                counts[10] := counts[10] + 1;
                others := others || ' unchanged-failed:' || state;
            ELSE
                pos := array_position(names, state);
                IF pos IS NULL THEN
                    counts[10] := counts[10] + 1;
                    others := others || ' ' || state;
                ELSE
                    counts[pos] := counts[pos] + 1;
                END IF;
            END IF;
        END;
    END LOOP;
    RETURN QUERY SELECT names[k] || CASE WHEN k = 10 THEN others ELSE '' END, counts[k]::bigint
                 FROM generate_series(1, 10) k;
END $$;
"#;

#[test]
fn a_million_hostile_ciphertexts_through_sql_give_the_original_or_a_documented_error() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "CREATE TABLE originals AS
             SELECT i AS id, (ARRAY['text', 'text in context', 'jsonb', 'bigint[]'])[1 + i % 4] AS kind,
                    'public.originals.c:' || i AS ctx,
                    CASE i % 4
                        WHEN 2 THEN jsonb_build_object('v', md5(i::text), 'n', i)::text
                        WHEN 3 THEN ARRAY[i, NULL, -i::bigint * 1000000007]::text
                        ELSE 'value ' || md5(i::text) || repeat('é', i % 7)
                    END AS plain
             FROM generate_series(1, 200) i;
         ALTER TABLE originals ADD COLUMN c bytea;
         CREATE FUNCTION encrypt_original(o originals) RETURNS bytea LANGUAGE sql AS $$
             SELECT CASE o.kind
                 WHEN 'text' THEN immuta_encrypt(o.plain)
                 WHEN 'text in context' THEN immuta_encrypt(o.plain, o.ctx)
                 WHEN 'jsonb' THEN immuta_encrypt(o.plain::jsonb)
                 ELSE immuta_encrypt(o.plain::bigint[], o.ctx)
             END $$;
         UPDATE originals o SET c = encrypt_original(o) WHERE id <= 100;
         SELECT immuta_rotate();
         UPDATE originals o SET c = encrypt_original(o) WHERE id > 100;",
    )
    .unwrap();
    c.batch_execute(FUZZ).unwrap();
    let rows = c.query("SELECT outcome, hits FROM fuzz(1000000)", &[]).unwrap();
    let tally: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let hits = |name: &str| tally.iter().find(|(n, _)| n.starts_with(name)).map(|t| t.1).unwrap();
    assert_eq!(tally.iter().map(|t| t.1).sum::<i64>(), 1_000_000, "{tally:?}");
    assert_eq!(hits("WRONG PLAINTEXT"), 0, "{tally:?}");
    assert_eq!(hits("other"), 0, "only documented errors: {tally:?}");
    for documented in ["original", "22P03", "0A000", "42704", "22000", "42804", "22023"] {
        assert!(hits(documented) > 1000, "every kind of input was exercised: {tally:?}");
    }
    // The server is still up and well.
    let back: String =
        c.query_one("SELECT immuta_decrypt(c) FROM originals WHERE id = 8", &[]).unwrap().get(0);
    assert!(back.starts_with("value "));
    assert!(!pg.log().contains("PANIC") && !pg.log().contains("server process"), "{}", pg.log());
}
