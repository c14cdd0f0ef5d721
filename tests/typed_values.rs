//! Typed values and contexts in a real server, through the roles: the attack from review (a
//! ciphertext copied into another row) fails when the context names the row, and still works
//! without one (the documented trade-off); every new function is granted as documented.

mod support;

use support::*;

#[test]
fn a_ciphertext_moved_to_another_row_does_not_decrypt_there_when_its_context_names_the_row() {
    let pg = Cluster::start(&[]);
    let mut admin = pg.connect();
    admin
        .batch_execute(
            "CREATE ROLE clerk LOGIN; GRANT immuta_encryptor TO clerk;
             CREATE ROLE auditor LOGIN; GRANT immuta_decryptor TO auditor;
             CREATE TABLE patients (id int PRIMARY KEY, name text, ssn bytea, ssn_unbound bytea,
                                    born bytea, chart bytea);
             GRANT SELECT, INSERT, UPDATE ON patients TO clerk;
             GRANT SELECT ON patients TO auditor;",
        )
        .unwrap();
    let mut clerk = pg.connect_as("clerk", "postgres");
    clerk
        .batch_execute(
            "INSERT INTO patients
             SELECT id, name,
                    immuta_encrypt(ssn, 'public.patients.ssn:' || id),
                    immuta_encrypt(ssn),
                    immuta_encrypt(born, 'public.patients.born:' || id),
                    immuta_encrypt(chart, 'public.patients.chart:' || id)
             FROM (VALUES (1, 'Alice', '123-45-6789', date '1980-02-29', jsonb '{\"allergies\": [\"penicillin\"]}'),
                          (2, 'Mallory', '987-65-4321', date '1990-01-01', jsonb '{}')) v(id, name, ssn, born, chart)",
        )
        .unwrap();
    // The encryptor writes but does not read, with or without a context, whatever the type.
    for q in [
        "SELECT immuta_decrypt(ssn, 'public.patients.ssn:' || id) FROM patients",
        "SELECT immuta_decrypt(born, NULL::date, 'public.patients.born:' || id) FROM patients",
        "SELECT immuta_decrypt_jsonb(chart, 'public.patients.chart:' || id) FROM patients",
    ] {
        assert_eq!(sqlstate(clerk.query(q, &[])), "42501", "{q}");
    }

    // Mallory's row gets Alice's ciphertexts (by anyone who may update the table).
    clerk
        .batch_execute(
            "UPDATE patients m SET ssn = a.ssn, ssn_unbound = a.ssn_unbound, born = a.born, chart = a.chart
             FROM patients a WHERE a.id = 1 AND m.id = 2",
        )
        .unwrap();

    let mut auditor = pg.connect_as("auditor", "postgres");
    let read = |c: &mut postgres::Client, q: &str| c.query_one(q, &[]).map(|r| r.get::<_, String>(0));
    // In its own row, each value reads.
    assert_eq!(
        read(
            &mut auditor,
            "SELECT immuta_decrypt(ssn, 'public.patients.ssn:' || id) FROM patients WHERE id = 1"
        )
        .unwrap(),
        "123-45-6789"
    );
    assert_eq!(
        read(&mut auditor, "SELECT immuta_decrypt(born, NULL::date, 'public.patients.born:' || id)::text FROM patients WHERE id = 1").unwrap(),
        "1980-02-29"
    );
    // Moved, a value bound to its row fails, with the SQLSTATE of a context that does not match
    // and a message that shows neither the context nor the value.
    for q in [
        "SELECT immuta_decrypt(ssn, 'public.patients.ssn:' || id) FROM patients WHERE id = 2",
        "SELECT immuta_decrypt(born, NULL::date, 'public.patients.born:' || id)::text FROM patients WHERE id = 2",
        "SELECT immuta_decrypt_jsonb(chart, 'public.patients.chart:' || id)::text FROM patients WHERE id = 2",
    ] {
        let result = read(&mut auditor, q);
        let text = error_text(read(&mut auditor, q));
        assert_eq!(sqlstate(result), "22023", "{q}");
        assert!(text.contains("context does not match"), "{text}");
        for secret in ["public.patients", "123-45-6789", "1980", "penicillin"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
    // Without a context, the moved value reads as Mallory's: the trade-off README documents.
    assert_eq!(
        read(&mut auditor, "SELECT immuta_decrypt(ssn_unbound) FROM patients WHERE id = 2").unwrap(),
        "123-45-6789"
    );
    // Nor does a bound value read without its context, or in another column's.
    assert_eq!(
        sqlstate(read(&mut auditor, "SELECT immuta_decrypt(ssn) FROM patients WHERE id = 1")),
        "22023"
    );
    assert_eq!(
        sqlstate(read(
            &mut auditor,
            "SELECT immuta_decrypt(ssn, 'public.patients.born:' || id) FROM patients WHERE id = 1"
        )),
        "22023"
    );
    // Nobody else may call the new functions.
    admin.batch_execute("CREATE ROLE nobody LOGIN; GRANT SELECT ON patients TO nobody").unwrap();
    let mut nobody = pg.connect_as("nobody", "postgres");
    for q in [
        "SELECT immuta_encrypt(1)",
        "SELECT immuta_encrypt('x', 'c')",
        "SELECT immuta_decrypt(ssn_unbound, NULL::text) FROM patients",
        "SELECT immuta_decrypt_bytea(ssn) FROM patients",
    ] {
        assert_eq!(sqlstate(nobody.query(q, &[])), "42501", "{q}");
    }
}

/// Every listed type, and an array of each, encrypted by a session with one set of settings and
/// decrypted by another session with other settings: the same values come back.
#[test]
fn every_type_round_trips_between_sessions_with_different_settings() {
    const VALUES: &[(&str, &str)] = &[
        ("'123-45-6789'", "text"),
        ("'\\x00ff0010'", "bytea"),
        ("'{\"a\": [1, 2.5, \"x\"]}'", "jsonb"),
        ("'{\"b\":1,  \"a\":[2]}'", "json"),
        ("'-1234567.891'", "numeric"),
        ("'-32768'", "int2"),
        ("'2147483647'", "int4"),
        ("'-9223372036854775808'", "int8"),
        ("'1.17549435e-38'", "float4"),
        ("'0.1'", "float8"),
        ("'true'", "bool"),
        ("'2024-02-29'", "date"),
        ("'23:59:59.999999'", "time"),
        ("'2024-02-29 12:34:56.789'", "timestamp"),
        ("'2024-02-29 12:34:56.789+05:30'", "timestamptz"),
        ("'1 year 2 months -3 days 04:05:06.5'", "interval"),
        ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "uuid"),
        ("'192.168.0.1/24'", "inet"),
        ("'2001:db8::/32'", "cidr"),
        ("'08:00:2b:01:02:03'", "macaddr"),
        ("'08:00:2b:01:02:03:04:05'", "macaddr8"),
        ("'12:00:00+05:30'", "timetz"),
        ("'12.34'", "money"),
    ];
    let pg = Cluster::start(&[]);
    let mut writer = pg.connect();
    writer
        .batch_execute(
            "SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo'; SET IntervalStyle = 'sql_standard';
             SET extra_float_digits = -15; SET bytea_output = 'escape'; SET lc_monetary = 'C';",
        )
        .unwrap();
    for (i, (literal, t)) in VALUES.iter().enumerate() {
        writer
            .batch_execute(&format!(
                "CREATE TABLE v{i} AS SELECT {literal}::{t} AS v, ARRAY[{literal}::{t}, NULL] AS a;
                 ALTER TABLE v{i} ADD COLUMN c bytea, ADD COLUMN ca bytea;
                 UPDATE v{i} SET c = immuta_encrypt(v, 'v{i}'), ca = immuta_encrypt(a);"
            ))
            .unwrap();
    }
    let mut reader = pg.connect();
    reader
        .batch_execute(
            "SET DateStyle = 'ISO, MDY'; SET TimeZone = 'America/New_York'; SET IntervalStyle = 'iso_8601';
             SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'POSIX';",
        )
        .unwrap();
    for (i, (_, t)) in VALUES.iter().enumerate() {
        // json has no equality: compared as the text it holds, which it keeps byte for byte.
        let cast = if *t == "json" { "::text" } else { "" };
        let (value, array) = if *t == "text" {
            (format!("immuta_decrypt(c, 'v{i}'){cast}"), format!("immuta_decrypt(ca, NULL::{t}[])"))
        } else {
            (
                format!("immuta_decrypt(c, NULL::{t}, 'v{i}'){cast}"),
                format!("immuta_decrypt(ca, NULL::{t}[])"),
            )
        };
        let array_same =
            if *t == "json" { format!("{array}::text = a::text") } else { format!("{array} = a") };
        let same: bool = reader
            .query_one(&format!("SELECT {value} = v{cast} AND {array_same} FROM v{i}"), &[])
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .get(0);
        assert!(same, "{t} changed between sessions");
    }
}
