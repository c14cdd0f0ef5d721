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
    ingest.batch_execute("INSERT INTO readings SELECT immuta_encrypt('reading ' || i) FROM generate_series(1, 10) i").unwrap();
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
    for denied in ["SELECT immuta_rotate()", "SELECT immuta_decrypt(immuta_encrypt('x'))", "SELECT immuta_status()"] {
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
    owner.batch_execute("INSERT INTO immuta.config (yaml) VALUES ('schedule: {dataKeyRollOverLength: 1}')").unwrap();
    let days: i32 = owner.query_one("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int", &[]).unwrap().get(0);
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
    c.batch_execute("DROP EXTENSION immuta; DROP ROLE immuta_decryptor; CREATE ROLE immuta_decryptor LOGIN").unwrap();
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
    ingest.batch_execute("SELECT public.immuta_rotate(); SELECT public.immuta_status(); SELECT * FROM immuta.keys").unwrap();
    let fresh = pg.connect_as("ingest", "postgres");
    drop(fresh);
    let mut ingest2 = pg.connect_as("ingest", "postgres");
    ingest2.batch_execute("SET search_path = trap, pg_temp, pg_catalog, public").unwrap();
    let back: String = ingest2.query_one("SELECT public.immuta_decrypt($1)", &[&v]).unwrap().get(0);
    assert_eq!(back, "x");
    ingest2.batch_execute("SELECT public.immuta_rotate_if_due(); SELECT public.immuta_rewrap()").unwrap();
    assert!(!pg.log().contains("hijacked"), "{}", pg.log());
}
