//! In-backend tests of typed values and contexts (format 2): every type round-trips, also across
//! session settings; the encodings are those of docs/vectors/format-v2.json; types and contexts
//! are enforced with their SQLSTATEs.

#[pgrx::pg_schema]
mod tests {
    use crate::pg_tests::sqlstate_of;
    use pgrx::prelude::*;
    use pgrx::AnyElement;

    fn yes(sql: &str) -> bool {
        Spi::get_one::<bool>(sql).unwrap().unwrap_or_else(|| panic!("NULL from {sql}"))
    }

    /// A literal of each listed type (and two more), with its SQL type; json is compared as text
    /// (it has no equality).
    const VALUES: &[(&str, &str)] = &[
        ("'123-45-6789'", "text"),
        ("''", "text"),
        ("'żółw 🐢 ☃'", "text"),
        ("'\\x00ff0010'", "bytea"),
        ("''", "bytea"),
        ("'{\"a\": [1, 2.5, \"x\", null, {\"b\": true}]}'", "jsonb"),
        ("'{\"b\":1,  \"a\":[2]}'", "json"),
        ("'-1234567.891'", "numeric"),
        ("'NaN'", "numeric"),
        ("'0.000000000000000000001'", "numeric"),
        ("'-32768'", "int2"),
        ("'2147483647'", "int4"),
        ("'-9223372036854775808'", "int8"),
        ("'1.17549435e-38'", "float4"),
        ("'-0.1'", "float8"),
        ("'Infinity'", "float8"),
        ("'true'", "bool"),
        ("'false'", "bool"),
        ("'2024-02-29'", "date"),
        ("'-infinity'", "date"),
        ("'23:59:59.999999'", "time"),
        ("'2024-02-29 12:34:56.789'", "timestamp"),
        ("'2024-02-29 12:34:56.789+05:30'", "timestamptz"),
        ("'infinity'", "timestamptz"),
        ("'1 year 2 months 3 days 04:05:06.5'", "interval"),
        ("'-178000000 years'", "interval"),
        ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "uuid"),
        ("'192.168.0.1/24'", "inet"),
        ("'2001:db8::1'", "inet"),
        ("'2001:db8::/32'", "cidr"),
        ("'08:00:2b:01:02:03'", "macaddr"),
        ("'08:00:2b:01:02:03:04:05'", "macaddr8"),
        ("'12:00:00+05:30'", "timetz"),
        ("'12.34'", "money"),
    ];

    fn same(a: &str, b: &str, t: &str) -> String {
        if t.starts_with("json") && !t.starts_with("jsonb") {
            format!("{a}::text IS NOT DISTINCT FROM {b}::text")
        } else {
            format!("{a} IS NOT DISTINCT FROM {b}")
        }
    }

    #[pg_test]
    fn every_listed_type_and_its_arrays_round_trip_with_and_without_a_context() {
        for &(literal, t) in VALUES {
            let v = format!("{literal}::{t}");
            // Text is read by the text forms: immuta_decrypt(c, NULL::text) would name a NULL
            // context (refused), the two-argument text form taking precedence.
            let (plain, bound) = if t == "text" {
                ("".to_owned(), ", 'row 1'".to_owned())
            } else {
                (format!(", NULL::{t}"), format!(", NULL::{t}, 'row 1'"))
            };
            for (enc, dec) in
                [(format!("immuta_encrypt({v})"), plain), (format!("immuta_encrypt({v}, 'row 1')"), bound)]
            {
                let back = format!("immuta_decrypt({enc}{dec})");
                assert!(yes(&format!("SELECT {}", same(&back, &v, t))), "{back}");
            }
            let arr = format!("ARRAY[{v}, NULL, {v}]::{t}[]");
            let back = format!("immuta_decrypt(immuta_encrypt({arr}, 'row 2'), NULL::{t}[], 'row 2')");
            assert!(yes(&format!("SELECT {}", same(&back, &arr, t))), "{back}");
            let back = format!("immuta_decrypt(immuta_encrypt('{{}}'::{t}[]), NULL::{t}[])");
            assert!(yes(&format!("SELECT cardinality({back}) = 0")), "{back}");
        }
        // Lower bounds other than 1 survive; the type is recorded in the header (byte 2).
        assert!(yes("SELECT immuta_decrypt(immuta_encrypt('[0:1]={a,b}'::text[]), NULL::text[]) = '[0:1]={a,b}'::text[]"));
        assert!(yes(
            "SELECT array_lower(immuta_decrypt(immuta_encrypt('[0:1]={a,b}'::text[]), NULL::text[]), 1) = 0"
        ));
        assert!(yes(
            "SELECT get_byte(immuta_encrypt(42), 2) = 7 AND get_byte(immuta_encrypt(ARRAY[42]), 2) = 135"
        ));
        // Named conveniences, varchar and a domain read as their base types.
        assert!(yes("SELECT immuta_decrypt_bytea(immuta_encrypt('\\x0102'::bytea)) = '\\x0102'::bytea"));
        assert!(yes(
            "SELECT immuta_decrypt_jsonb(immuta_encrypt('{\"a\":1}'::jsonb, 'c'), 'c') = '{\"a\":1}'::jsonb"
        ));
        assert!(yes("SELECT immuta_decrypt(immuta_encrypt('abc'::varchar(5))) = 'abc'"));
        assert!(yes(
            "SELECT immuta_decrypt(immuta_encrypt('{ab,cd}'::varchar[]), NULL::varchar[]) = '{ab,cd}'"
        ));
        // A domain is encrypted as its base type, and decrypted only as the base type (a value
        // decrypted as the domain would skip its constraints): the cast checks them.
        Spi::run("CREATE DOMAIN pg_temp.positive AS int4 CHECK (VALUE > 0)").unwrap();
        assert!(yes("SELECT immuta_decrypt(immuta_encrypt(7::pg_temp.positive), NULL::int4) = 7"));
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(immuta_encrypt(-5), NULL::pg_temp.positive)"), "0A000");
        assert_eq!(
            sqlstate_of("SELECT immuta_decrypt(immuta_encrypt(-5), NULL::int4)::pg_temp.positive"),
            "23514"
        );
        // int2vector has an element type but is no array: refused, not built from an int2[].
        assert_eq!(
            sqlstate_of("SELECT immuta_decrypt(immuta_encrypt('{}'::int2[]), NULL::int2vector)"),
            "0A000"
        );
        assert_eq!(
            sqlstate_of("SELECT immuta_decrypt(immuta_encrypt('{1,NULL}'::int2[]), NULL::int2vector)"),
            "0A000"
        );
        // A large value (5 MiB, toasted in and out).
        assert!(yes(
            "SELECT immuta_decrypt(immuta_encrypt(convert_to(repeat('x', 5 << 20), 'UTF8')), NULL::bytea) \
                     = convert_to(repeat('x', 5 << 20), 'UTF8')"
        ));
    }

    #[pg_test]
    fn the_encoding_does_not_depend_on_session_settings() {
        // Each: a setting, the value under which it is encrypted, the value under which it is
        // decrypted, and a literal whose meaning those settings change in text form.
        let cases = [
            ("DateStyle", "'SQL, DMY'", "'ISO, MDY'", "'2024-02-29'::date"),
            ("DateStyle", "'German'", "'Postgres, MDY'", "'2024-02-29 12:34:56'::timestamp"),
            ("TimeZone", "'Asia/Tokyo'", "'America/New_York'", "'2024-02-29 12:00:00+00'::timestamptz"),
            ("TimeZone", "'UTC'", "'Asia/Kolkata'", "'12:00:00+01'::timetz"),
            (
                "IntervalStyle",
                "'sql_standard'",
                "'iso_8601'",
                "'1 year 2 months -3 days 04:05:06.5'::interval",
            ),
            ("extra_float_digits", "-15", "3", "0.1::float8"),
            ("extra_float_digits", "-15", "3", "ARRAY[0.1, 1e-300]::float8[]"),
            ("bytea_output", "'escape'", "'hex'", "'\\x00ff'::bytea"),
            ("lc_monetary", "'C'", "'POSIX'", "'1234.56'::money"),
            ("client_encoding", "'LATIN1'", "'UTF8'", "'{\"ż\": \"ółw\"}'::jsonb"),
        ];
        for (setting, at_encrypt, at_decrypt, literal) in cases {
            let t = Spi::get_one::<String>(&format!("SELECT pg_typeof({literal})::text")).unwrap().unwrap();
            Spi::run(&format!("SET {setting} = {at_encrypt}")).unwrap();
            Spi::run(&format!(
                "CREATE TEMP TABLE s AS SELECT immuta_encrypt({literal}) AS c, {literal} AS v, {literal}::text AS shown"
            ))
            .unwrap();
            Spi::run(&format!("SET {setting} = {at_decrypt}")).unwrap();
            assert!(yes(&format!("SELECT immuta_decrypt(c, NULL::{t}) = v FROM s")), "{setting}: {literal}");
            assert!(
                yes(&format!("SELECT immuta_decrypt(c, NULL::{t}) = {literal} FROM s")),
                "{setting}: {literal}"
            );
            Spi::run(&format!("RESET {setting}; DROP TABLE s")).unwrap();
        }
    }

    /// docs/vectors/format-v2.json gives, for SQL literals, the encoding FORMAT.md specifies,
    /// worked out independently: immuta's encoding of each literal is exactly that, and decoding
    /// it gives the literal back.
    #[pg_test]
    fn the_encodings_are_those_of_the_known_answer_vectors() {
        let all: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/vectors/format-v2.json")).unwrap();
        for v in all["ciphertext_v2"].as_array().unwrap() {
            let sql = v["sql"].as_str().unwrap();
            let expected = v["encoding"].as_str().unwrap();
            Spi::connect(|client| {
                let row = client.select(&format!("SELECT {sql}"), None, &[]).unwrap().first();
                let value = row.get::<AnyElement>(1).unwrap().unwrap();
                let t = crate::typed::sql_type(value.oid());
                assert_eq!(t.value_type.to_byte() as u64, v["type_byte"].as_u64().unwrap(), "{sql}");
                let encoded = crate::typed::encode(&t, value.datum(), |bytes| {
                    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
                });
                assert_eq!(encoded, expected, "encoding of {sql}");
                let mut with_nul: Vec<u8> = (0..expected.len() / 2)
                    .map(|i| u8::from_str_radix(&expected[2 * i..2 * i + 2], 16).unwrap())
                    .chain([0])
                    .collect();
                let decoded = crate::typed::decode(&t, &mut with_nul);
                let again = crate::typed::encode(&t, decoded, |bytes| {
                    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
                });
                assert_eq!(again, expected, "decoding of {sql}");
            });
        }
    }

    #[pg_test]
    fn a_value_is_read_as_its_own_type_only() {
        Spi::run("CREATE TEMP TABLE v AS SELECT immuta_encrypt('{\"a\":1}'::jsonb) AS j, immuta_encrypt(12.5) AS n")
            .unwrap();
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(j, NULL::numeric) FROM v"), "42804");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(j) FROM v"), "42804");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(n, NULL::numeric[]) FROM v"), "42804");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt_bytea(n) FROM v"), "42804");
        assert!(yes("SELECT immuta_decrypt(n, NULL::numeric) = 12.5 FROM v"));
        // Types immuta does not encrypt, and arrays of two dimensions.
        assert_eq!(sqlstate_of("SELECT immuta_encrypt(point '(1,2)')"), "0A000");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(immuta_encrypt(1), NULL::point)"), "0A000");
        assert_eq!(sqlstate_of("SELECT immuta_encrypt('{{1,2},{3,4}}'::int[])"), "0A000");
    }

    #[pg_test]
    fn a_context_is_required_exactly_as_given() {
        Spi::run(
            "CREATE TEMP TABLE p AS SELECT immuta_encrypt('123-45-6789', 'patients.ssn:1') AS bound, \
             immuta_encrypt('123-45-6789') AS free, immuta_encrypt(42, 'x') AS typed",
        )
        .unwrap();
        assert!(yes("SELECT immuta_decrypt(bound, 'patients.ssn:1') = '123-45-6789' FROM p"));
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(bound, 'patients.ssn:2') FROM p"), "22023");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(bound) FROM p"), "22023");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(free, 'patients.ssn:1') FROM p"), "22023");
        assert!(yes("SELECT immuta_decrypt(free) = '123-45-6789' FROM p"));
        // Where a context is named, NULL is refused, as when encrypting: a context expression
        // that is NULL must not let an unbound value through.
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(bound, NULL) FROM p"), "22004");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(free, NULL::text) FROM p"), "22004");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(typed, NULL::int4, NULL) FROM p"), "22004");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt_bytea(free, NULL) FROM p"), "22004");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt_jsonb(free, NULL) FROM p"), "22004");
        // Contexts are bounded (64 KiB).
        assert_eq!(sqlstate_of("SELECT immuta_encrypt('x', repeat('c', 65537))"), "54000");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(bound, repeat('c', 65537)) FROM p"), "54000");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(typed, NULL::int4) FROM p"), "22023");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(typed, NULL::int4, 'y') FROM p"), "22023");
        assert!(yes("SELECT immuta_decrypt(typed, NULL::int4, 'x') = 42 FROM p"));
        // A NULL context is refused when encrypting: it would bind the value to nothing.
        assert_eq!(sqlstate_of("SELECT immuta_encrypt('x', NULL::text)"), "22004");
        assert_eq!(sqlstate_of("SELECT immuta_encrypt(1, NULL)"), "22004");
        assert!(Spi::get_one::<Vec<u8>>("SELECT immuta_encrypt(NULL::text, 'c')").unwrap().is_none());
        // The message does not echo the context.
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.message_of(q text) RETURNS text LANGUAGE plpgsql AS $$ \
             DECLARE m text; d text; h text; BEGIN EXECUTE q; RETURN ''; EXCEPTION WHEN OTHERS THEN \
             GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT; \
             RETURN m || d || h; END $$",
        )
        .unwrap();
        let text = Spi::get_one::<String>(
            "SELECT pg_temp.message_of('SELECT immuta_decrypt(bound, ''secret-ctx'') FROM p')",
        )
        .unwrap()
        .unwrap();
        assert!(text.contains("context does not match") && !text.contains("secret-ctx"), "{text}");
    }

    /// Arguments are read in place when stored inline and uncompressed, and detoasted otherwise
    /// (`varlena::Bytes`): plaintexts and contexts in every form PostgreSQL stores them (each form
    /// checked in the catalog, so that the test cannot pass without it), and ciphertexts with
    /// short and long headers and out of line.
    #[pg_test]
    fn arguments_are_read_whole_in_every_storage_form() {
        let md5s = |n: u32| format!("(SELECT string_agg(md5(i::text), '') FROM generate_series(1, {n}) i)");
        // (form, value, storage of the plaintext and context columns, context too)
        let forms = [
            ("short", "'123-45-6789'".to_string(), "EXTENDED", true),
            ("inline", md5s(6), "EXTENDED", true),
            ("compressed", "repeat('abc', 2000)".to_string(), "EXTENDED", true),
            ("external", md5s(1875), "EXTERNAL", true),
            ("external_compressed", "repeat('abcdefgh', 500000)".to_string(), "EXTENDED", false),
        ];
        for (form, value, storage, with_context) in forms {
            let table = format!("form_{form}");
            Spi::run(&format!(
                "CREATE TEMP TABLE {table} (v text, ctx text); \
                 ALTER TABLE {table} ALTER COLUMN v SET STORAGE {storage}, ALTER COLUMN ctx SET STORAGE {storage}; \
                 INSERT INTO {table} SELECT x, CASE WHEN {with_context} THEN x ELSE 'place' END \
                 FROM (SELECT {value} AS x) s; \
                 CREATE TEMP TABLE {table}_c AS SELECT immuta_encrypt(v) AS c, immuta_encrypt(v, ctx) AS cc FROM {table}"
            ))
            .unwrap();
            let toasted = Spi::get_one::<String>(&format!(
                "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = '{table}'::regclass"
            ))
            .unwrap()
            .unwrap();
            let out_of_line = yes(&format!("SELECT count(*) > 0 FROM {toasted}"));
            let compressed = yes(&format!("SELECT pg_column_compression(v) IS NOT NULL FROM {table}"));
            let (want_out_of_line, want_compressed) = match form {
                "short" | "inline" => (false, false),
                "compressed" => (false, true),
                "external" => (true, false),
                _ => (true, true),
            };
            assert_eq!((out_of_line, compressed), (want_out_of_line, want_compressed), "storage of {form}");
            assert!(
                yes(&format!(
                    "SELECT immuta_decrypt(c) = v AND immuta_decrypt(cc, ctx) = v \
                     AND immuta_decrypt_bytea(immuta_encrypt(convert_to(v, 'UTF8'))) \
                     = convert_to(v, 'UTF8') AND immuta_key_id(c) = immuta_key_id(cc) FROM {table}, {table}_c"
                )),
                "{form}"
            );
            // A context in any form must still match exactly.
            assert_eq!(
                sqlstate_of(&format!("SELECT immuta_decrypt(cc, ctx || 'x') FROM {table}, {table}_c")),
                "22023",
                "{form}"
            );
        }
    }

    /// The type of `as_type` is resolved once per call site (`typed::of_argument`, kept in
    /// `fn_extra`): a call site that sees other types in other calls resolves each one, whether
    /// through a polymorphic PL/pgSQL function called with several types in one transaction, or
    /// through the wrapper PostgreSQL puts around a function with a `SET` clause.
    #[pg_test]
    fn the_type_asked_for_is_the_type_of_each_call() {
        Spi::run(
            "CREATE FUNCTION pg_temp.open_as(c bytea, t anyelement) RETURNS anyelement LANGUAGE plpgsql \
             AS $$ BEGIN RETURN immuta_decrypt(c, t); END $$; \
             CREATE FUNCTION pg_temp.seal(v anyelement) RETURNS bytea LANGUAGE plpgsql \
             AS $$ BEGIN RETURN immuta_encrypt(v); END $$",
        )
        .unwrap();
        for _ in 0..2 {
            assert!(yes("SELECT pg_temp.open_as(pg_temp.seal(42::int8), NULL::int8) = 42"));
            assert!(yes("SELECT pg_temp.open_as(pg_temp.seal(4.25::numeric), NULL::numeric) = 4.25"));
            assert!(yes(
                "SELECT pg_temp.open_as(pg_temp.seal('{1,NULL,3}'::int4[]), NULL::int4[]) = '{1,NULL,3}'"
            ));
            assert_eq!(sqlstate_of("SELECT pg_temp.open_as(pg_temp.seal(42::int8), NULL::numeric)"), "42804");
        }
        // A function with a SET clause is called through fmgr_security_definer, which keeps its
        // own fn_extra and calls immuta with a copy of the call's FmgrInfo.
        Spi::run(
            "ALTER FUNCTION immuta_decrypt(bytea, anyelement) SET search_path = pg_catalog; \
             ALTER FUNCTION immuta_encrypt(anyelement) SET search_path = pg_catalog",
        )
        .unwrap();
        assert!(yes("SELECT bool_and(immuta_decrypt(immuta_encrypt(i), NULL::int8) = i \
             AND immuta_decrypt(immuta_encrypt(i::numeric / 7), NULL::numeric) = i::numeric / 7) \
             FROM generate_series(1::int8, 100) i"));
        assert!(yes("SELECT pg_temp.open_as(pg_temp.seal('2024-02-29'::date), NULL::date) = '2024-02-29'"));
    }
}
