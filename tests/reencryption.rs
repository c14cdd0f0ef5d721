//! System tier: data under old keys (issue 15): `immuta_reencrypt`, the inventory of a column by
//! key, and retiring a key end to end once nothing is left under it.

mod support;

use support::*;

fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut postgres::Client, query: &str) -> T {
    c.query_one(query, &[]).unwrap().get(0)
}

/// `(key_id, keyring, state, is_current, value_count)` rows of the inventory of `t.col`.
fn inventory(c: &mut postgres::Client, col: &str) -> Vec<(i64, String, String, bool, i64)> {
    c.query(&format!("SELECT * FROM immuta_inventory('t', '{col}')"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[test]
fn reencryption_moves_every_kind_of_value_to_its_keyrings_current_key_and_leaves_current_ones_as_they_are() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_keyring_create('tenant');
         CREATE TABLE t (id int PRIMARY KEY, s bytea, n bytea, a bytea, j bytea, k bytea, big bytea);
         INSERT INTO t SELECT i,
             immuta_encrypt('ssn ' || i, 'row ' || i),
             immuta_encrypt(i * 1.5),
             immuta_encrypt(ARRAY[i, NULL, -i]::int8[]),
             immuta_encrypt(jsonb_build_object('i', i)),
             immuta_encrypt('tenant value ' || i, keyring => 'tenant'),
             immuta_encrypt(repeat('x', 100000) || i)
           FROM generate_series(1, 20) i;",
    )
    .unwrap();
    let old: i64 = one(&mut c, "SELECT immuta_key_id(s) FROM t LIMIT 1");
    let old_tenant: i64 = one(&mut c, "SELECT immuta_key_id(k) FROM t LIMIT 1");
    // Under the current key: the same bytes, and the value is still opened (a wrong context fails).
    assert!(one::<bool>(&mut c, "SELECT bool_and(immuta_reencrypt(n) = n) FROM t"));
    assert!(one::<bool>(&mut c, "SELECT bool_and(immuta_reencrypt(s, 'row ' || id) = s) FROM t"));
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s, 'row 0') FROM t LIMIT 1", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s) FROM t LIMIT 1", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s, NULL) FROM t LIMIT 1", &[])), "22004");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt('\\x0102'::bytea)", &[])), "22P03");

    let new: i64 = one(&mut c, "SELECT immuta_rotate()");
    let new_tenant: i64 = one(&mut c, "SELECT immuta_rotate('tenant')");
    c.batch_execute(
        "UPDATE t SET s = immuta_reencrypt(s, 'row ' || id), n = immuta_reencrypt(n), a = immuta_reencrypt(a),
                      j = immuta_reencrypt(j), k = immuta_reencrypt(k), big = immuta_reencrypt(big)",
    )
    .unwrap();
    let keys: Vec<(i64, i64)> = c
        .query("SELECT DISTINCT immuta_key_id(s), immuta_key_id(k) FROM t", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys, vec![(new, new_tenant)], "each value under its own keyring's current key");
    assert!(old != new && old_tenant != new_tenant);
    let intact: i64 = one(
        &mut c,
        "SELECT count(*) FROM t WHERE immuta_decrypt(s, 'row ' || id) = 'ssn ' || id
            AND immuta_decrypt(n, NULL::numeric) = id * 1.5
            AND immuta_decrypt(a, NULL::int8[]) = ARRAY[id, NULL, -id]::int8[]
            AND immuta_decrypt_jsonb(j) = jsonb_build_object('i', id)
            AND immuta_decrypt(k) = 'tenant value ' || id
            AND immuta_decrypt(big) = repeat('x', 100000) || id",
    );
    assert_eq!(intact, 20, "same values, same types, same context");
    // The type travels with the value: a re-encrypted number is still a number.
    assert_eq!(sqlstate(c.query_one("SELECT immuta_decrypt(n) FROM t LIMIT 1", &[])), "42804");
}

#[test]
fn the_inventory_counts_values_per_key_and_a_key_is_retired_once_nothing_is_left_under_it() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_keyring_create('tenant');
         CREATE TABLE t (id int PRIMARY KEY, v bytea, other int);
         INSERT INTO t SELECT i, immuta_encrypt('v' || i) FROM generate_series(1, 30) i;
         INSERT INTO t SELECT i, immuta_encrypt('v' || i, keyring => 'tenant') FROM generate_series(31, 40) i;
         INSERT INTO t VALUES (41, NULL);",
    )
    .unwrap();
    let first: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t WHERE id = 1");
    let tenant_key: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t WHERE id = 31");
    let second: i64 = one(&mut c, "SELECT immuta_rotate()");
    c.batch_execute("UPDATE t SET v = immuta_encrypt('v' || id) WHERE id <= 10").unwrap();
    assert_eq!(
        inventory(&mut c, "v"),
        vec![
            (first, "default".into(), "decrypt-only".into(), false, 20),
            (tenant_key, "tenant".into(), "active".into(), true, 10),
            (second, "default".into(), "active".into(), true, 10),
        ]
    );
    assert_eq!(sqlstate(c.query("SELECT * FROM immuta_inventory('t', 'other')", &[])), "42804");
    assert_eq!(sqlstate(c.query("SELECT * FROM immuta_inventory('t', 'nope')", &[])), "42703");
    assert_eq!(sqlstate(c.query("SELECT * FROM immuta_inventory('nope', 'v')", &[])), "42P01");

    // Retirement: re-encrypt what is left under the old key, check, disable, destroy.
    c.batch_execute(&format!("UPDATE t SET v = immuta_reencrypt(v) WHERE immuta_key_id(v) = {first}"))
        .unwrap();
    assert!(inventory(&mut c, "v").iter().all(|(id, ..)| *id != first), "nothing left under the old key");
    c.batch_execute(&format!(
        "SELECT immuta_key_disable({first}, 'retired'); SELECT immuta_key_destroy({first}, 'retired')"
    ))
    .unwrap();
    let readable: i64 = one(&mut c, "SELECT count(*) FROM t WHERE immuta_decrypt(v) = 'v' || id");
    assert_eq!(readable, 40, "every value still decrypts after the old key is destroyed");
}

#[test]
fn reencryption_needs_the_decryptor_and_refuses_values_under_disabled_or_destroyed_keys() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "CREATE ROLE dec LOGIN IN ROLE immuta_decryptor;
         CREATE ROLE enc LOGIN IN ROLE immuta_encryptor;
         CREATE ROLE adm LOGIN IN ROLE immuta_admin;
         CREATE TABLE t (id int PRIMARY KEY, v bytea);
         GRANT SELECT, UPDATE ON t TO dec, enc, adm;
         INSERT INTO t SELECT i, immuta_encrypt('v' || i) FROM generate_series(1, 10) i;",
    )
    .unwrap();
    let old: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t LIMIT 1");
    c.batch_execute("SELECT immuta_rotate()").unwrap();
    let mut enc = pg.connect_as("enc", "postgres");
    assert_eq!(sqlstate(enc.execute("UPDATE t SET v = immuta_reencrypt(v)", &[])), "42501");
    assert_eq!(sqlstate(enc.query("SELECT * FROM immuta_inventory('t', 'v')", &[])), "42501");
    let mut adm = pg.connect_as("adm", "postgres");
    assert_eq!(inventory(&mut adm, "v").len(), 1, "the admin takes the inventory");
    let mut dec = pg.connect_as("dec", "postgres");
    assert_eq!(dec.execute("UPDATE t SET v = immuta_reencrypt(v) WHERE id <= 5", &[]).unwrap(), 5);

    c.batch_execute(&format!("SELECT immuta_key_disable({old}, 'compromised')")).unwrap();
    assert_eq!(sqlstate(dec.execute("UPDATE t SET v = immuta_reencrypt(v)", &[])), "55000");
    c.batch_execute(&format!("SELECT immuta_key_destroy({old}, 'compromised')")).unwrap();
    assert_eq!(sqlstate(dec.execute("UPDATE t SET v = immuta_reencrypt(v)", &[])), "42704");
    let moved: i64 = one(
        &mut dec,
        &format!("SELECT count(*) FROM t WHERE immuta_key_id(v) <> {old} AND immuta_decrypt(v) = 'v' || id"),
    );
    assert_eq!(moved, 5, "the values moved before the key was destroyed are safe");
}
