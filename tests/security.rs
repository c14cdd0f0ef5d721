//! The security model: the three roles, installation by a database owner who is not a
//! superuser (the extension is trusted), and objects planted to hijack immuta's queries.

mod support;

use support::*;

/// Creates login roles: `ingest` (encrypt only), `reader` (decrypt only), `keeper` (admin),
/// `nobody` (no immuta role).
fn create_roles(c: &mut postgres::Client) {
    c.batch_execute(
        "CREATE ROLE ingest LOGIN; GRANT immuta_encryptor TO ingest;
         CREATE ROLE reader LOGIN; GRANT immuta_decryptor TO reader;
         CREATE ROLE keeper LOGIN; GRANT immuta_admin TO keeper;
         CREATE ROLE nobody LOGIN;
         CREATE TABLE readings (v bytea); GRANT SELECT, INSERT ON readings TO ingest, reader, keeper, nobody;",
    )
    .unwrap();
}

#[test]
fn each_role_can_do_what_it_is_for_and_nothing_else() {
    let pg = Cluster::start(&[]);
    create_roles(&mut pg.connect());

    // An ingest job encrypts (and creates the first key) but cannot decrypt.
    let mut ingest = pg.connect_as("ingest", "postgres");
    ingest
        .batch_execute(
            "INSERT INTO readings SELECT immuta_encrypt('reading ' || i) FROM generate_series(1, 10) i",
        )
        .unwrap();
    assert_eq!(sqlstate(ingest.query_one("SELECT immuta_decrypt(v) FROM readings LIMIT 1", &[])), "42501");
    for denied in [
        "SELECT immuta_rotate()",
        "SELECT immuta_status()",
        "SELECT * FROM immuta.data_keys",
        "SELECT * FROM immuta.keys",
        "SELECT * FROM immuta.audit_log",
        "SELECT * FROM immuta.config",
        "DELETE FROM immuta.data_keys",
        "INSERT INTO immuta.key_usage VALUES (1, 1)",
        "SELECT immuta.encryptions_counted(1)",
    ] {
        assert_eq!(sqlstate(ingest.batch_execute(denied)), "42501", "ingest: {denied}");
    }

    // A reader decrypts but cannot encrypt.
    let mut reader = pg.connect_as("reader", "postgres");
    let n: i64 = reader
        .query_one("SELECT count(*) FROM readings WHERE immuta_decrypt(v) LIKE 'reading %'", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 10);
    assert_eq!(sqlstate(reader.query_one("SELECT immuta_encrypt('x')", &[])), "42501");
    assert_eq!(sqlstate(reader.batch_execute("SELECT immuta_rewrap()")), "42501");

    // The admin manages keys and reads status and audit, but neither encrypts, decrypts, nor
    // touches the tables themselves.
    let mut keeper = pg.connect_as("keeper", "postgres");
    let rotated: i64 = keeper.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    keeper.batch_execute("SELECT immuta_status(); SELECT immuta_rewrap(); SELECT immuta_cache_reset(); SELECT immuta_config()").unwrap();
    keeper.query_one("SELECT immuta_configure('schedule: {dataKeyRollOverLength: 30}')", &[]).unwrap();
    let keys: i64 = keeper.query_one("SELECT count(*) FROM immuta.keys", &[]).unwrap().get(0);
    assert_eq!(keys, 2);
    let (role, session_role): (String, String) = keeper
        .query_one("SELECT role::text, session_role::text FROM immuta.audit_log WHERE key_id = $1 AND event = 'key rotated'", &[&rotated])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((role.as_str(), session_role.as_str()), ("keeper", "keeper"));
    let creator: String =
        keeper.query_one("SELECT created_by::text FROM immuta.keys WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(creator, "ingest", "the first key was created by the ingest job's encryption");
    for denied in [
        "SELECT immuta_encrypt('x')",
        "SELECT immuta_decrypt(v) FROM readings",
        "SELECT * FROM immuta.data_keys",
        "SELECT * FROM immuta.config",
        "UPDATE immuta.audit_log SET reason = 'manual'",
    ] {
        assert_eq!(sqlstate(keeper.batch_execute(denied)), "42501", "keeper: {denied}");
    }

    // Nobody else can do anything with immuta at all.
    let mut nobody = pg.connect_as("nobody", "postgres");
    for denied in [
        "SELECT immuta_encrypt('x')",
        "SELECT immuta_decrypt(v) FROM readings",
        "SELECT immuta_key_id(v) FROM readings",
        "SELECT immuta_rotate()",
        "SELECT immuta_cache_stats()",
        "SELECT * FROM immuta.keys",
    ] {
        assert_eq!(sqlstate(nobody.batch_execute(denied)), "42501", "nobody: {denied}");
    }
}

#[test]
fn a_database_owner_who_is_not_a_superuser_installs_and_uses_immuta_in_that_database_only() {
    let pg = Cluster::start(&[]);
    pg.connect().batch_execute("CREATE ROLE owner LOGIN; CREATE ROLE clerk LOGIN").unwrap();
    pg.connect().batch_execute("CREATE DATABASE shop OWNER owner").unwrap();
    let mut owner = pg.connect_as("owner", "shop");
    owner.batch_execute("CREATE EXTENSION immuta").unwrap();
    let back: String =
        owner.query_one("SELECT immuta_decrypt(immuta_encrypt('card 4111'))", &[]).unwrap().get(0);
    assert_eq!(back, "card 4111");
    owner.query_one("SELECT immuta_rotate()", &[]).unwrap();
    owner.query_one("SELECT count(*) FROM immuta.keys", &[]).unwrap();

    // The installer passes privileges on in its database (GRANT OPTION), but gets no membership
    // in the cluster-wide roles: those would reach into every other database.
    owner.batch_execute("GRANT EXECUTE ON FUNCTION immuta_encrypt(text) TO clerk").unwrap();
    let mut clerk = pg.connect_as("clerk", "shop");
    clerk.query_one("SELECT immuta_encrypt('x')", &[]).unwrap();
    assert_eq!(sqlstate(clerk.query_one("SELECT immuta_decrypt(immuta_encrypt('x'))", &[])), "42501");
    assert_eq!(sqlstate(owner.batch_execute("GRANT immuta_decryptor TO clerk")), "42501");
    let mut elsewhere = pg.connect_as("owner", "postgres");
    for denied in
        ["SELECT immuta_rotate()", "SELECT immuta_decrypt(immuta_encrypt('x'))", "SELECT immuta_status()"]
    {
        assert_eq!(sqlstate(elsewhere.batch_execute(denied)), "42501", "owner in postgres: {denied}");
    }

    // What a non-superuser could abuse stays out of reach, even for the owner.
    for (denied, state) in [
        ("SET immuta.master_key_file = '/tmp/mine.key'", "55P02"),
        ("SET immuta.config_file = '/tmp/mine.yaml'", "55P02"),
        ("ALTER SYSTEM SET immuta.master_key_file = '/tmp/mine.key'", "42501"),
        ("ALTER SYSTEM SET immuta.max_encryptions_per_key = 1", "42501"),
        ("SET immuta.kms_timeout = 1000", "42501"),
        ("SELECT * FROM immuta.data_keys", "42501"),
        ("UPDATE immuta.config SET yaml = ''", "42501"),
        ("DELETE FROM immuta.audit_log", "42501"),
        // Adding rows directly is for restoring into a fresh installation only.
        ("INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapping_region, wrapped_key, reason) \
          VALUES (99, 'awsKms', 'arn:aws:kms:us-east-1:1:key/x', 'us-east-1', '\\x00', 'manual')", "42501"),
        ("INSERT INTO immuta.key_usage VALUES (2, 1)", "42501"),
        ("INSERT INTO immuta.audit_log (event, reason) VALUES ('cache reset', 'manual')", "42501"),
    ] {
        assert_eq!(sqlstate(owner.batch_execute(denied)), state, "owner: {denied}");
    }
    // A configuration slipped in directly is left out, with a warning.
    owner
        .batch_execute("INSERT INTO immuta.config (yaml) VALUES ('schedule: {dataKeyRollOverLength: 1}')")
        .unwrap();
    let days: i32 = owner
        .query_one("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int", &[])
        .unwrap()
        .get(0);
    assert_eq!(days, 365);
    // Using the server's own AWS identity, or choosing where keys are sent, is a superuser's decision.
    let kms = "plugins: {awsKms: {plugin: awsKms, isKms: true, keyId: alias/x, region: us-east-1}}";
    assert_eq!(sqlstate(owner.query_one("SELECT immuta_configure($1)", &[&kms])), "42501");
    let endpoint = "plugins: {awsKms: {plugin: awsKms, isKms: false, keyId: alias/x, region: us-east-1, \
                    extraKmsConfig: {endpoint: 'https://kms.example.com'}}}";
    assert_eq!(sqlstate(owner.query_one("SELECT immuta_configure($1)", &[&endpoint])), "42501");
}

#[test]
fn a_role_of_immutas_names_that_can_log_in_is_not_adopted() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute("DROP EXTENSION immuta; DROP ROLE immuta_decryptor; CREATE ROLE immuta_decryptor LOGIN")
        .unwrap();
    let text = error_text(c.batch_execute("CREATE EXTENSION immuta"));
    assert!(text.contains("\"immuta_decryptor\" exists and can log in"), "{text}");
    c.batch_execute("ALTER ROLE immuta_decryptor NOLOGIN; CREATE EXTENSION immuta").unwrap();
}

#[test]
fn look_alikes_planted_before_installation_never_bind_into_immuta() {
    let pg = Cluster::start(&[]);
    pg.connect().batch_execute("CREATE ROLE owner LOGIN").unwrap();
    pg.connect().batch_execute("CREATE DATABASE shop OWNER owner").unwrap();
    let mut owner = pg.connect_as("owner", "shop");
    // Better matches than pg_catalog's for what the install script uses; each raises if called.
    owner
        .batch_execute(
            "CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked nextval'; END $$;
             CREATE FUNCTION public.mul(integer, numeric) RETURNS numeric LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked *'; END $$;
             CREATE OPERATOR public.* (LEFTARG = integer, RIGHTARG = numeric, FUNCTION = public.mul);
             CREATE FUNCTION public.make_interval(secs numeric) RETURNS interval LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked make_interval'; END $$;
             CREATE FUNCTION public.max(bigint) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked max'; END $$;
             CREATE FUNCTION public.format(text, text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked format'; END $$;",
        )
        .unwrap();
    owner.batch_execute("CREATE EXTENSION immuta").unwrap();
    owner
        .batch_execute(
            "SELECT immuta_encrypt('x'); SELECT immuta_rotate(); SELECT immuta_cache_reset();
             SELECT * FROM immuta.keys; SELECT * FROM immuta.audit_log;",
        )
        .unwrap();
    // A superuser reading the view must not run the owner's code either.
    pg.connect_to("shop").batch_execute("SELECT * FROM immuta.keys").unwrap();
    assert!(!pg.log().contains("hijacked"), "{}", pg.log());
}

#[test]
fn objects_planted_in_the_callers_schemas_never_run_inside_immuta() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    create_roles(&mut c);
    // A role that may create objects plants look-alikes of everything immuta's queries use;
    // each raises if it is ever called.
    c.batch_execute(
        "CREATE SCHEMA trap AUTHORIZATION ingest;
         GRANT immuta_decryptor, immuta_admin TO ingest;",
    )
    .unwrap();
    let mut ingest = pg.connect_as("ingest", "postgres");
    ingest
        .batch_execute(
            "CREATE FUNCTION trap.hijacked() RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
             CREATE FUNCTION trap.eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked ='; END $$;
             CREATE OPERATOR trap.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = trap.eq);
             CREATE FUNCTION trap.nextval(regclass) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked nextval'; END $$;
             CREATE FUNCTION trap.now() RETURNS timestamptz LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked now'; END $$;
             CREATE FUNCTION trap.pg_get_userbyid(oid) RETURNS name LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked pg_get_userbyid'; END $$;
             CREATE FUNCTION trap.jsonb_build_object(VARIADIC text[]) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked jsonb'; END $$;
             CREATE TEMP TABLE data_keys (id bigint);
             CREATE TEMP TABLE key_usage (key_id bigint, encryptions bigint);
             SET search_path = trap, pg_temp, pg_catalog, public;",
        )
        .unwrap();
    // Every path that queries immuta's tables: first key, usage rows, decrypt of a key not yet
    // loaded, rotation with its audit row, status, the keys view, scheduled rollover.
    let v: Vec<u8> = ingest.query_one("SELECT public.immuta_encrypt('x')", &[]).unwrap().get(0);
    ingest
        .batch_execute(
            "SELECT public.immuta_rotate(); SELECT public.immuta_status(); SELECT * FROM immuta.keys",
        )
        .unwrap();
    let fresh = pg.connect_as("ingest", "postgres");
    drop(fresh);
    let mut ingest2 = pg.connect_as("ingest", "postgres");
    ingest2.batch_execute("SET search_path = trap, pg_temp, pg_catalog, public").unwrap();
    let back: String = ingest2.query_one("SELECT public.immuta_decrypt($1)", &[&v]).unwrap().get(0);
    assert_eq!(back, "x");
    ingest2.batch_execute("SELECT public.immuta_rotate_if_due(); SELECT public.immuta_rewrap()").unwrap();
    assert!(!pg.log().contains("hijacked"), "{}", pg.log());
}

/// A database `shop` owned by `tenant`, a role that is not a superuser, with immuta installed by
/// it; returns a session of the tenant there.
fn tenant_installation(pg: &Cluster) -> postgres::Client {
    pg.create_database("shop", Some("tenant"));
    let mut tenant = pg.connect_as("tenant", "shop");
    tenant.batch_execute("CREATE EXTENSION immuta").unwrap();
    tenant
}

/// Runs `statement` in a savepoint of the open transaction of `c` and returns its SQLSTATE.
fn in_savepoint(c: &mut postgres::Client, statement: &str) -> String {
    c.batch_execute("SAVEPOINT attempt").unwrap();
    let state = sqlstate(c.batch_execute(statement));
    c.batch_execute("ROLLBACK TO SAVEPOINT attempt").unwrap();
    state
}

const FORGED_ROWS: [&str; 3] = [
    "INSERT INTO immuta.audit_log (id, event, reason) VALUES (100, 'cache reset', 'manual')",
    "INSERT INTO immuta.key_usage VALUES (1, 4611686018427387904), (1, 4611686018427387904)",
    "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapped_key, reason) \
     SELECT 50, provider, wrapping_key, wrapped_key, 'manual' FROM (VALUES ('local', 'aaaaaaaaaaaaaaaa', '\\x00'::bytea)) v(provider, wrapping_key, wrapped_key)",
];

#[test]
fn an_old_snapshot_cannot_reopen_the_restore_window() {
    let pg = Cluster::start(&[]);
    let _tenant = tenant_installation(&pg);
    // A REPEATABLE READ transaction of the tenant's, begun while the installation was fresh.
    let mut early = pg.connect_as("tenant", "shop");
    early.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class").unwrap();
    // Then immuta is used.
    let mut app = pg.connect_to("shop");
    let value = encrypt(&mut app, "in use");
    // The old snapshot still sees empty tables; the window is closed anyway.
    for forged in FORGED_ROWS {
        assert_eq!(in_savepoint(&mut early, forged), "42501", "{forged}");
    }
    early.batch_execute("COMMIT").unwrap();
    let (keys, current): (i64, i64) = app
        .query_one("SELECT count(*), max(id) FILTER (WHERE is_current) FROM immuta.keys", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((keys, current), (1, 1));
    let events: i64 = app.query_one("SELECT count(*) FROM immuta.audit_log", &[]).unwrap().get(0);
    assert_eq!(events, 1);
    assert_eq!(decrypt(&mut app, &value).unwrap(), "in use");
}

#[test]
fn the_restore_window_closes_for_good_at_immutas_first_write() {
    let pg = Cluster::start(&[]);
    let mut tenant = tenant_installation(&pg);
    // A rotation creates a key and an audit entry, but no usage row: key_usage is still empty.
    tenant.batch_execute("SELECT immuta_rotate()").unwrap();
    for forged in FORGED_ROWS {
        assert_eq!(sqlstate(tenant.batch_execute(forged)), "42501", "{forged}");
    }
    let text = error_text(tenant.batch_execute(FORGED_ROWS[1]));
    assert!(text.contains("immuta has been used in this database"), "{text}");
    // Counting still works: nothing was added.
    let counted: i64 = tenant.query_one("SELECT encryptions FROM immuta.keys", &[]).unwrap().get(0);
    assert_eq!(counted, 0);
}

#[test]
fn rows_the_owner_restores_are_held_to_what_immuta_writes() {
    let pg = Cluster::start(&[]);
    let mut tenant = tenant_installation(&pg);
    let fingerprint = "aaaaaaaaaaaaaaaa";
    let wrapped = format!("\\x{}", "00".repeat(61));
    for (row, why) in [
        (
            format!("(9223372036854775807, 'local', '{fingerprint}', NULL, '{wrapped}', 'manual', now())"),
            "an id no later id fits above",
        ),
        (
            format!("(2, 'local', '{fingerprint}', NULL, '{wrapped}', 'manual', 'infinity')"),
            "created in the future: never due",
        ),
        (
            format!("(2, 'local', '{fingerprint}', NULL, '{wrapped}', 'manual', '-infinity')"),
            "created at -infinity",
        ),
        (
            format!("(2, 'local', '{fingerprint}', NULL, '\\x00', 'manual', now())"),
            "a wrapped key of another length",
        ),
        (
            "(2, 'awsKms', 'alias/k', 'us-east-1.attacker.example', '\\x00', 'manual', now())".to_owned(),
            "a region that is a host name",
        ),
        (
            "(2, 'awsKms', 'alias k', 'us-east-1', '\\x00', 'manual', now())".to_owned(),
            "a key reference with white space",
        ),
    ] {
        let insert = format!(
            "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapping_region, wrapped_key, reason, created_at) VALUES {row}"
        );
        assert_eq!(sqlstate(tenant.batch_execute(&insert)), "22023", "{why}");
    }
    let blocks_a_later_rollover = format!(
        "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapped_key, reason, rolled_over_from) \
         VALUES (2, 'local', '{fingerprint}', '{wrapped}', 'schedule', 3)"
    );
    assert_eq!(
        sqlstate(tenant.batch_execute(&blocks_a_later_rollover)),
        "22023",
        "a later key as its predecessor"
    );
    assert_eq!(
        sqlstate(tenant.batch_execute("INSERT INTO immuta.key_usage VALUES (1, 4611686018427387904)")),
        "22023"
    );
    // A row immuta could have written is restored, untrusted.
    tenant
        .batch_execute(
            "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapping_region, wrapped_key, reason, server_identity) \
             VALUES (2, 'awsKms', 'alias/k', 'us-east-1', '\\x00', 'manual', true)",
        )
        .unwrap();
    let trusted: bool =
        pg.connect_to("shop").query_one("SELECT server_identity FROM immuta.data_keys", &[]).unwrap().get(0);
    assert!(!trusted, "a restored row never lends the server's identity");
}

#[test]
fn sequences_the_owner_may_move_decide_nothing() {
    let pg = Cluster::start(&[]);
    let mut tenant = tenant_installation(&pg);
    encrypt(&mut tenant, "first");
    let current = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT id FROM immuta.keys WHERE is_current", &[]).unwrap().get(0)
    };
    // Ahead: the next rotation's key is current, whatever the sequence says.
    tenant.batch_execute("SELECT setval('immuta.data_keys_id_seq', 1000)").unwrap();
    let r1: i64 = tenant.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!(current(&mut tenant), r1);
    // Back: a rotation after a compromise still replaces the key that encrypts.
    tenant.batch_execute("SELECT setval('immuta.data_keys_id_seq', 1)").unwrap();
    let r2: i64 = tenant.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert!(r2 > r1, "{r2} > {r1}");
    assert_eq!(current(&mut tenant), r2);
    assert_eq!(encrypted_key_id(&mut tenant, "after"), r2);
    // To the end, and the audit log's back to the start: rotations go on.
    tenant
        .batch_execute(
            "SELECT setval('immuta.data_keys_id_seq', 9223372036854775807);
             SELECT setval('immuta.audit_log_id_seq', 1, false);",
        )
        .unwrap();
    let r3: i64 = tenant.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!((r3, current(&mut tenant)), (r2 + 1, r2 + 1));
    let ids: Vec<i64> = tenant
        .query("SELECT id FROM immuta.audit_log ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>(), "one event each, in order");
}

#[test]
fn a_transaction_holding_the_key_creation_lock_cannot_be_prepared() {
    let pg = Cluster::start(&["max_prepared_transactions = 4"]);
    let mut c = pg.connect();
    create_roles(&mut c);
    let mut ingest = pg.connect_as("ingest", "postgres");
    // An encryptor's first encryption creates the first key...
    ingest.batch_execute("BEGIN; SELECT immuta_encrypt('x')").unwrap();
    let refused = ingest.batch_execute("PREPARE TRANSACTION 'hold'").unwrap_err();
    let refused = refused.as_db_error().expect("an error of the server");
    assert_eq!(refused.code().code(), "0A000", "{}", refused.message());
    assert!(refused.message().contains("cannot PREPARE"), "{}", refused.message());
    ingest.batch_execute("ROLLBACK").unwrap();
    // ...and no prepared transaction holds back every other session's.
    let mut other = pg.connect();
    other.batch_execute("SET lock_timeout = '30s'").unwrap();
    encrypt(&mut other, "y");
    let mut keeper = pg.connect_as("keeper", "postgres");
    keeper.batch_execute("BEGIN; SELECT immuta_rotate()").unwrap();
    assert_eq!(sqlstate(keeper.batch_execute("PREPARE TRANSACTION 'hold2'")), "0A000");
    // Nor one that compacted usage rows (the scheduled job's work) or stored a configuration.
    for change in ["SELECT immuta_rotate_if_due()", "SELECT immuta_configure('')"] {
        keeper.batch_execute(&format!("BEGIN; {change}")).unwrap();
        assert_eq!(sqlstate(keeper.batch_execute("PREPARE TRANSACTION 'hold3'")), "0A000", "{change}");
    }
    // Encrypting under an existing key takes no such lock: that transaction may be prepared.
    ingest.batch_execute("BEGIN; SELECT immuta_encrypt('z'); PREPARE TRANSACTION 'fine'").unwrap();
    other.query_one("SELECT immuta_rotate()", &[]).unwrap();
    c.batch_execute("COMMIT PREPARED 'fine'").unwrap();
    let prepared: i64 = c.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).unwrap().get(0);
    assert_eq!(prepared, 0);
}

#[test]
fn errors_inside_immuta_show_neither_internal_ids_nor_a_backtrace() {
    let pg = Cluster::start_with_env(&[], &[("RUST_BACKTRACE", "1")]);
    let mut c = pg.connect();
    for _ in 0..5 {
        c.batch_execute("SELECT immuta_rotate()").unwrap();
    }
    // A superuser's edit makes the next rollover's row collide with an existing one.
    c.batch_execute(
        "UPDATE immuta.data_keys SET rolled_over_from = 5 WHERE id = 2;
         UPDATE immuta.data_keys SET created_at = now() - interval '400 days' WHERE id = 5",
    )
    .unwrap();
    let result = c.query_one("SELECT immuta_rotate_if_due()", &[]);
    let text = error_text(c.query_one("SELECT immuta_rotate_if_due()", &[]));
    assert_eq!(sqlstate(result), "40001", "{text}");
    for internal in ["Key (", "rolled_over_from", "=(5)", "backtrace", ".rs:", "pgrx"] {
        assert!(!text.contains(internal), "{internal}: {text}");
    }
}

#[test]
fn a_savepoint_cannot_keep_the_restore_window_open() {
    let pg = Cluster::start(&[]);
    let _tenant = tenant_installation(&pg);
    // In a fresh installation, the tenant has each table checked inside savepoints it rolls back,
    // and keeps the transaction open.
    let mut early = pg.connect_as("tenant", "shop");
    early.batch_execute("BEGIN").unwrap();
    let invalid = [
        "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapped_key, reason) \
         VALUES (1, 'local', 'aaaaaaaaaaaaaaaa', '\\x00', 'manual')",
        "INSERT INTO immuta.key_usage VALUES (1, 0)",
        "INSERT INTO immuta.audit_log (id, event, reason) VALUES (0, 'cache reset', 'manual')",
    ];
    for attempt in invalid {
        assert_eq!(in_savepoint(&mut early, attempt), "22023", "{attempt}");
    }
    // Meanwhile immuta is used...
    let mut app = pg.connect_to("shop");
    app.batch_execute("SET lock_timeout = '30s'").unwrap();
    encrypt(&mut app, "in use");
    // ...and the window is closed for the open transaction too.
    for forged in FORGED_ROWS {
        assert_eq!(in_savepoint(&mut early, forged), "42501", "{forged}");
    }
    early.batch_execute("COMMIT").unwrap();
}

#[test]
fn a_prepared_transaction_of_the_owner_holds_nothing_immuta_needs() {
    let pg = Cluster::start(&["max_prepared_transactions = 4"]);
    let mut tenant = tenant_installation(&pg);
    // INSERT privilege (for restores) lets the owner lock immuta.data_keys in ROW EXCLUSIVE mode.
    tenant
        .batch_execute(
            "BEGIN;
             LOCK TABLE immuta.data_keys IN ROW EXCLUSIVE MODE;
             INSERT INTO immuta.key_usage SELECT 1, 1 WHERE false;
             PREPARE TRANSACTION 'hold'",
        )
        .unwrap();
    let mut app = pg.connect_to("shop");
    app.batch_execute("SET lock_timeout = '30s'").unwrap();
    encrypt(&mut app, "first key");
    app.query_one("SELECT immuta_rotate()", &[]).unwrap();
    app.query_one("SELECT immuta_cache_reset()", &[]).unwrap();
    pg.connect_to("shop").batch_execute("ROLLBACK PREPARED 'hold'").unwrap();
}

#[test]
fn ids_immuta_hands_out_past_the_highest_restored_one_are_used_like_any_other() {
    let pg = Cluster::start(&[]);
    encrypt(&mut pg.connect(), "the cluster's master key exists");
    let mut tenant = tenant_installation(&pg);
    let highest = 1i64 << 62;
    tenant
        .execute(
            "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapped_key, reason) \
             VALUES ($1, 'local', 'aaaaaaaaaaaaaaaa', decode(repeat('00', 61), 'hex'), 'manual')",
            &[&highest],
        )
        .unwrap();
    let next: i64 = tenant.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!(next, highest + 1);
    let value = encrypt(&mut tenant, "past the restored ids");
    assert_eq!(key_id_of(&mut tenant, &value), next);
    assert_eq!(decrypt(&mut pg.connect_as("tenant", "shop"), &value).unwrap(), "past the restored ids");
}

#[test]
fn no_role_can_hold_the_key_creation_lock() {
    let pg = Cluster::start(&["max_prepared_transactions = 4"]);
    let mut c = pg.connect();
    create_roles(&mut c);
    encrypt(&mut c, "a key");
    // nextval() locks a sequence before it checks privileges, and a rolled-back savepoint does
    // not release that lock: any role that can connect may hold it on immuta.key_ids.
    let key_ids: i64 = c.query_one("SELECT 'immuta.key_ids'::regclass::oid::int8", &[]).unwrap().get(0);
    let mut nobody = pg.connect_as("nobody", "postgres");
    nobody.batch_execute("BEGIN; SAVEPOINT s").unwrap();
    let denied = nobody.batch_execute(&format!("SELECT pg_catalog.nextval({key_ids}::oid::regclass)"));
    assert_eq!(sqlstate(denied), "42501");
    nobody.batch_execute("ROLLBACK TO SAVEPOINT s; PREPARE TRANSACTION 'held'").unwrap();
    // It holds nothing key creation needs.
    let mut keeper = pg.connect_as("keeper", "postgres");
    keeper.batch_execute("SET lock_timeout = '30s'").unwrap();
    keeper.query_one("SELECT immuta_rotate()", &[]).unwrap();
    keeper.query_one("SELECT immuta_cache_reset()", &[]).unwrap();
    c.batch_execute("ROLLBACK PREPARED 'held'").unwrap();
}
