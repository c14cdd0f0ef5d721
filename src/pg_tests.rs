//! In-backend tests of the SQL surface (`cargo pgrx test`). Multi-session behaviour, restarts and
//! files are in the system tier (tests/).

mod typed;

/// Runs `sql` and returns the SQLSTATE it raised, or "00000".
fn sqlstate_of(sql: &str) -> String {
    use pgrx::prelude::*;
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$ \
         BEGIN EXECUTE q; RETURN '00000'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()]).unwrap().unwrap()
}

#[pgrx::pg_schema]
mod tests {
    use super::sqlstate_of;
    use pgrx::prelude::*;

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).unwrap().expect("non-NULL result")
    }

    #[pg_test]
    fn encrypt_then_decrypt_round_trips_text_of_every_kind() {
        for text in ["", "123-45-6789", "żółw 🐢 ☃ 東京", "a'b\"c\\d"] {
            let back: String =
                Spi::get_one_with_args("SELECT immuta_decrypt(immuta_encrypt($1))", &[text.into()])
                    .unwrap()
                    .unwrap();
            assert_eq!(back, text);
        }
        let big: bool = one("SELECT immuta_decrypt(immuta_encrypt(repeat('x', 5 * 1024 * 1024))) = repeat('x', 5 * 1024 * 1024)");
        assert!(big);
    }

    #[pg_test]
    fn null_in_is_null_out() {
        assert_eq!(Spi::get_one::<Vec<u8>>("SELECT immuta_encrypt(NULL)").unwrap(), None);
        assert_eq!(Spi::get_one::<String>("SELECT immuta_decrypt(NULL)").unwrap(), None);
    }

    #[pg_test]
    fn encrypting_twice_gives_different_ciphertexts_of_documented_length() {
        assert!(one::<bool>("SELECT immuta_encrypt('same') <> immuta_encrypt('same')"));
        assert_eq!(one::<i32>("SELECT length(immuta_encrypt('12345'))"), 5 + 39);
        assert_eq!(
            one::<String>("SELECT encode(substring(immuta_encrypt('x') FROM 1 FOR 3), 'hex')"),
            "020001"
        );
    }

    #[pg_test]
    fn function_volatility_is_as_documented() {
        let each = |f: &str, column: &str| {
            one::<Vec<String>>(&format!(
                "SELECT array_agg(DISTINCT {column}::text) FROM pg_proc WHERE proname = '{f}'"
            ))
        };
        assert_eq!(each("immuta_encrypt", "provolatile"), ["v"]);
        assert_eq!(each("immuta_decrypt", "provolatile"), ["s"]);
        assert_eq!(each("immuta_encrypt", "proparallel"), ["s"]);
        assert_eq!(each("immuta_decrypt", "proparallel"), ["s"]);
        assert!(one::<bool>(
            "SELECT proisstrict FROM pg_proc WHERE oid = 'immuta_encrypt(text)'::regprocedure"
        ));
    }

    #[pg_test]
    fn rotate_makes_a_new_current_key_and_old_values_still_decrypt() {
        Spi::run("CREATE TEMP TABLE t AS SELECT immuta_encrypt('before') AS c").unwrap();
        let old_key: i64 = one("SELECT immuta_key_id(c) FROM t");
        let new_key: i64 = one("SELECT immuta_rotate()");
        assert!(new_key > old_key);
        assert_eq!(one::<i64>("SELECT immuta_key_id(immuta_encrypt('after'))"), new_key);
        assert_eq!(one::<String>("SELECT immuta_decrypt(c) FROM t"), "before");
        assert_eq!(one::<i64>("SELECT id FROM immuta.keys WHERE is_current"), new_key);
        assert!(one::<bool>(
            "SELECT rollover_due_at IS NULL FROM immuta.keys WHERE id = (SELECT immuta_key_id(c) FROM t)"
        ));
        assert!(one::<bool>(
            "SELECT rollover_due_at = created_at + interval '365 days' FROM immuta.keys WHERE is_current"
        ));
        assert_eq!(one::<String>(&format!("SELECT reason FROM immuta.keys WHERE id = {new_key}")), "manual");
    }

    #[pg_test]
    fn keys_are_stored_only_wrapped_with_the_master_key_fingerprint() {
        one::<i64>("SELECT immuta_rotate()");
        assert_eq!(
            one::<i32>("SELECT length(wrapped_key) FROM immuta.data_keys ORDER BY id DESC LIMIT 1"),
            61
        );
        assert_eq!(one::<String>("SELECT provider FROM immuta.keys ORDER BY id DESC LIMIT 1"), "local");
        assert!(one::<bool>(
            "SELECT wrapping_key ~ '^[0-9a-f]{16}$' FROM immuta.keys ORDER BY id DESC LIMIT 1"
        ));
    }

    #[pg_test]
    fn bad_ciphertexts_raise_their_documented_sqlstates() {
        assert_eq!(sqlstate_of("SELECT immuta_decrypt('\\x0102'::bytea)"), "22P03");
        assert_eq!(sqlstate_of("SELECT immuta_decrypt(''::bytea)"), "22P03");
        assert_eq!(
            sqlstate_of("SELECT immuta_decrypt(set_byte(immuta_encrypt('x'), 0, 9))"),
            "0A000",
            "unknown format version"
        );
        assert_eq!(
            sqlstate_of("SELECT immuta_decrypt(overlay(immuta_encrypt('x') PLACING '\\x00000000000f4240'::bytea FROM 4))"),
            "42704",
            "unknown key id"
        );
        assert_eq!(
            sqlstate_of("WITH c AS (SELECT immuta_encrypt('secret') AS v) SELECT immuta_decrypt(set_byte(v, 25, get_byte(v, 25) # 1)) FROM c"),
            "22000",
            "tampered body"
        );
        let c: Vec<u8> = one("SELECT immuta_encrypt('abcdef')");
        let cut =
            format!("SELECT immuta_decrypt(substring('\\x{}'::bytea FROM 1 FOR {}))", hex(&c), c.len() - 3);
        assert_eq!(sqlstate_of(&cut), "22000", "a value cut after the header fails authentication");
    }

    /// Runs `sql` and returns its error's message, detail and hint, joined.
    fn error_text_of(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_text_of(q text) RETURNS text LANGUAGE plpgsql AS $$ \
             DECLARE m text; d text; h text; \
             BEGIN EXECUTE q; RETURN ''; EXCEPTION WHEN OTHERS THEN \
               GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT; \
               RETURN concat_ws(' | ', m, d, h); END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_text_of($1)", &[sql.into()]).unwrap().unwrap()
    }

    #[pg_test]
    fn error_messages_name_the_problem_without_echoing_the_value() {
        // A bit of the body flipped (setting the byte to a constant would leave it as it was
        // one time in 256, and the value would decrypt).
        let tampered = "SELECT immuta_decrypt(set_byte(c, 30, get_byte(c, 30) # 1)) \
                        FROM (SELECT immuta_encrypt('PLAINTEXT-4111') AS c) s";
        let text = error_text_of(tampered);
        assert!(text.contains("failed authentication"), "{text}");
        assert!(!text.contains("PLAINTEXT") && !text.contains("\\x"), "{text}");
        let text = error_text_of("SELECT immuta_decrypt('\\x0300000000000000016162636465666768697071727374757677787980818283848586878889909192'::bytea)");
        assert!(text.contains("version 3"), "{text}");
        assert!(!text.contains("6162"), "{text}");
    }

    #[pg_test]
    fn configuration_round_trips_and_bad_documents_change_nothing() {
        let shown: pgrx::JsonB = one("SELECT immuta_configure('schedule:\n  dataKeyRollOverLength: 30\n')");
        assert_eq!(shown.0["schedule"]["dataKeyRollOverLength"], 30);
        assert_eq!(one::<i32>("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int"), 30);
        for bad in [
            "schedule:\n  dataKeyRollOverLength: -1\n",
            "schedule:\n  dataKeyRollOverLength: 0\n",
            "schedule:\n  dataKeyRolloverLength: 3\n",
            "schedule: [\n",
        ] {
            let sql = format!("SELECT immuta_configure({})", pgrx::spi::quote_literal(bad));
            assert_eq!(sqlstate_of(&sql), "22023", "{bad}");
        }
        assert_eq!(one::<i32>("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int"), 30);
        assert_eq!(sqlstate_of("SELECT immuta_configure(NULL)"), "22004");
        one::<pgrx::JsonB>("SELECT immuta_configure('')");
        assert_eq!(one::<i32>("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int"), 365);
    }

    #[pg_test]
    fn configuration_never_shows_credentials() {
        one::<pgrx::JsonB>(
            "SELECT immuta_configure('plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: false\n    keyId: alias/x\n    region: us-east-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: AKIDEXAMPLE\n        secretAccessKey: wJalrXUtnFEMIsecret\n        sessionToken: tokentokentoken\n')",
        );
        let shown = one::<pgrx::JsonB>("SELECT immuta_config()").0.to_string();
        assert!(!shown.contains("wJalrXUtnFEMIsecret") && !shown.contains("tokentokentoken"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"));
    }

    #[pg_test]
    fn the_rollover_view_follows_the_configured_length() {
        one::<i64>("SELECT immuta_rotate()");
        one::<pgrx::JsonB>("SELECT immuta_configure('schedule:\n  dataKeyRollOverLength: 7\n')");
        assert!(one::<bool>(
            "SELECT rollover_due_at = created_at + interval '7 days' FROM immuta.keys WHERE is_current"
        ));
    }

    #[pg_test]
    fn mutated_ciphertexts_through_sql_give_only_documented_errors_or_the_original() {
        // 3000 values: random bit flips, truncations, extensions and header rewrites of real
        // ciphertexts; each must decrypt to its original (only if unchanged) or raise one of the
        // documented SQLSTATEs, never XX000 and never another plaintext.
        Spi::run(
            "CREATE FUNCTION pg_temp.decrypt_state(m bytea, p text, c bytea) RETURNS text LANGUAGE plpgsql AS $$ \
             DECLARE r text; \
             BEGIN \
               r := immuta_decrypt(m); \
               IF m = c AND r = p THEN RETURN 'same'; END IF; \
               RETURN 'WRONG PLAINTEXT'; \
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$",
        )
        .unwrap();
        let states: Vec<String> = Spi::connect(|client| {
            client
                .select(
                    "WITH src AS (SELECT i, md5(i::text) AS p, immuta_encrypt(md5(i::text)) AS c FROM generate_series(1, 3000) i),
                     mutated AS (
                       SELECT p, c, CASE i % 5
                         WHEN 0 THEN set_byte(c, (i * 7) % length(c), get_byte(c, (i * 7) % length(c)) # (1 << (i % 8)))
                         WHEN 1 THEN substring(c FROM 1 FOR (i * 13) % length(c))
                         WHEN 2 THEN c || '\\x00ff'::bytea
                         WHEN 3 THEN overlay(c PLACING int8send(i) FROM 2 + 2 * (i % 2))
                         ELSE set_byte(c, 0, i % 256) END AS m
                       FROM src)
                     SELECT DISTINCT pg_temp.decrypt_state(m, p, c) FROM mutated",
                    None,
                    &[],
                )
                .map(|t| t.map(|r| r.get::<String>(1).unwrap().unwrap()).collect())
        })
        .unwrap_or_default();
        assert!(!states.is_empty());
        for s in &states {
            assert!(
                ["22P03", "0A000", "42704", "42804", "22023", "22000", "22021", "same"].contains(&s.as_str()),
                "{states:?}"
            );
        }
    }

    #[pg_test]
    fn rewrap_wraps_every_key_again_and_every_value_still_decrypts() {
        Spi::run("CREATE TEMP TABLE r AS SELECT immuta_encrypt('a') AS c").unwrap();
        one::<i64>("SELECT immuta_rotate()");
        Spi::run("INSERT INTO r SELECT immuta_encrypt('b')").unwrap();
        let before: Vec<u8> = one("SELECT wrapped_key FROM immuta.data_keys ORDER BY id LIMIT 1");
        let n: i32 = one("SELECT immuta_rewrap()");
        assert_eq!(i64::from(n), one::<i64>("SELECT count(*) FROM immuta.data_keys"));
        let after: Vec<u8> = one("SELECT wrapped_key FROM immuta.data_keys ORDER BY id LIMIT 1");
        assert_ne!(before, after, "a fresh wrapping (new nonce)");
        assert_eq!(one::<String>("SELECT string_agg(immuta_decrypt(c), ',' ORDER BY 1) FROM r"), "a,b");
    }

    #[pg_test]
    fn without_preload_the_cache_works_per_backend_and_reset_is_not_for_public() {
        one::<Vec<u8>>("SELECT immuta_encrypt('x')");
        assert_eq!(one::<String>("SELECT immuta_cache_stats()->>'mode'"), "backend");
        assert!(one::<i64>("SELECT (immuta_cache_stats()->>'backend_keys')::int8") >= 1);
        assert_eq!(one::<i64>("SELECT immuta_cache_reset()"), 0, "no shared cache to empty");
        assert_eq!(one::<i64>("SELECT (immuta_cache_stats()->>'backend_keys')::int8"), 0);
        assert_eq!(one::<String>("SELECT immuta_decrypt(immuta_encrypt('after reset'))"), "after reset");
        let public = "SELECT has_function_privilege('public', 'immuta_cache_reset(boolean)', 'execute')";
        assert!(!one::<bool>(public));
    }

    #[pg_test]
    fn every_key_event_is_audited_with_its_reason_and_role() {
        let since: i64 = one("SELECT COALESCE(max(id), 0) FROM immuta.audit_log");
        let first_existed = one::<i64>("SELECT count(*) FROM immuta.data_keys") > 0;
        one::<Vec<u8>>("SELECT immuta_encrypt('x')");
        let rotated: i64 = one("SELECT immuta_rotate()");
        one::<i32>("SELECT immuta_rewrap()");
        one::<i64>("SELECT immuta_cache_reset()");
        let events: String = Spi::get_one_with_args(
            "SELECT string_agg(event || '/' || reason, ',' ORDER BY id) FROM immuta.audit_log WHERE id > $1",
            &[since.into()],
        )
        .unwrap()
        .unwrap();
        let keys: i64 = one("SELECT count(*) FROM immuta.data_keys");
        let mut expected = Vec::new();
        if !first_existed {
            expected.push("key created/first use".to_string());
        }
        expected.push("key rotated/manual".into());
        expected.extend((0..keys).map(|_| "key rewrapped/manual".to_string()));
        expected.push("cache reset/manual".into());
        assert_eq!(events, expected.join(","));
        let row = Spi::get_three_with_args::<String, bool, i64>(
            "SELECT detail->>'provider', role = current_user AND session_role = session_user,                     (detail->>'previous_key')::int8 FROM immuta.audit_log WHERE key_id = $1 AND event = 'key rotated'",
            &[rotated.into()],
        )
        .unwrap();
        assert_eq!(row.0.as_deref(), Some("local"));
        assert_eq!(row.1, Some(true));
        assert_eq!(row.2, Some(rotated - 1));
        assert!(!one::<bool>("SELECT has_table_privilege('public', 'immuta.audit_log', 'select')"));
    }

    #[pg_test]
    fn rotate_if_due_rolls_over_only_an_overdue_key_and_says_why() {
        let current: i64 = one("SELECT immuta_rotate()");
        assert_eq!(Spi::get_one::<i64>("SELECT immuta_rotate_if_due()").unwrap(), None, "nothing due");
        assert_eq!(one::<i64>("SELECT max(id) FROM immuta.data_keys"), current);
        Spi::run("UPDATE immuta.data_keys SET created_at = now() - interval '366 days' WHERE id = (SELECT max(id) FROM immuta.data_keys)")
            .unwrap();
        let new: i64 = one("SELECT immuta_rotate_if_due()");
        assert!(new > current);
        let (reason, from) = Spi::get_two_with_args::<String, i64>(
            "SELECT reason, rolled_over_from FROM immuta.data_keys WHERE id = $1",
            &[new.into()],
        )
        .unwrap();
        assert_eq!((reason.as_deref(), from), (Some("schedule"), Some(current)));
        assert_eq!(one::<String>("SELECT reason FROM immuta.audit_log ORDER BY id DESC LIMIT 1"), "schedule");
        assert_eq!(
            Spi::get_one::<i64>("SELECT immuta_rotate_if_due()").unwrap(),
            None,
            "the new key is not due"
        );
        Spi::run(
            "INSERT INTO immuta.key_usage (key_id, encryptions) SELECT k, n FROM generate_series(1, 5) n, \
             (SELECT max(id) AS k FROM immuta.data_keys) m",
        )
        .unwrap();
        let before: i64 = one("SELECT sum(encryptions)::int8 FROM immuta.key_usage");
        assert_eq!(Spi::get_one::<i64>("SELECT immuta_rotate_if_due()").unwrap(), None);
        assert_eq!(
            one::<i64>("SELECT sum(encryptions)::int8 FROM immuta.key_usage"),
            before,
            "folded, not lost"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) - count(DISTINCT key_id) FROM immuta.key_usage"),
            0,
            "one row per key"
        );
    }

    #[pg_test]
    fn status_describes_the_current_key_and_the_missing_pg_cron() {
        let current: i64 = one("SELECT immuta_rotate()");
        one::<Vec<u8>>("SELECT immuta_encrypt('x')");
        let status: pgrx::JsonB = one("SELECT immuta_status()");
        let s = status.0;
        assert_eq!(s["current_key"]["id"].as_i64(), Some(current));
        assert_eq!(s["current_key"]["provider"], "local");
        assert_eq!(s["current_key"]["rollover_due"], false);
        assert_eq!(s["current_key"]["max_encryptions_per_key"].as_i64(), Some(2_000_000_000));
        assert!(s["current_key"]["encryptions"].as_i64().unwrap() >= 1);
        assert_eq!(s["cache_mode"], "backend");
        assert_eq!(s["pg_cron_loaded"], false);
        assert_eq!(s["rotation_job_present"], false);
        assert!(s["rotation_job_error"].as_str().unwrap().contains("pg_cron is not installed"));
        assert_eq!(sqlstate_of("SELECT immuta_schedule_rotation()"), "42704");
        assert_eq!(sqlstate_of("SELECT immuta_schedule_rotation(repeat('*', 300))"), "22023");
        assert!(!one::<bool>(
            "SELECT has_function_privilege('public', 'immuta_schedule_rotation(text)', 'execute')"
        ));
        let (counted, limit) =
            Spi::get_two::<i64, i64>("SELECT encryptions, max_encryptions FROM immuta.keys WHERE is_current")
                .unwrap();
        assert!(counted.unwrap() >= 1);
        assert_eq!(limit, Some(2_000_000_000));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
