#!/usr/bin/env python3
"""Known-answer vectors of ciphertext format 2 (docs/FORMAT.md, section 1), computed here with
Python's `cryptography` and `struct`, independently of immuta's code. Writes format-v2.json.

Each vector gives an SQL literal, the encoding of its value as FORMAT.md specifies it (worked out
below by hand from the specification, not by PostgreSQL or immuta), and the ciphertext under a
fixed data key, key id and nonce, with or without a context. The unit tests check that immuta's
core seals and opens exactly these bytes; the in-backend tests check that immuta's encoding of
each literal is exactly the `encoding` given.

Run: python3 docs/vectors/generate_v2.py  (needs the `cryptography` package)
"""
import datetime
import json
import os
import struct
import uuid

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY = bytes(range(32))
EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)

# Type bytes (FORMAT.md, section 1.2); an array sets bit 7.
TYPES = {"text": 1, "bytea": 2, "json": 3, "jsonb": 4, "numeric": 5, "smallint": 6, "integer": 7,
         "bigint": 8, "real": 9, "double precision": 10, "boolean": 11, "date": 12, "time": 13,
         "timestamp": 14, "timestamptz": 15, "interval": 16, "uuid": 17, "inet": 18, "cidr": 19,
         "macaddr": 20, "macaddr8": 21, "timetz": 22, "money": 23}


def numeric(sign, weight, dscale, digits):
    """numeric: ndigits, weight, sign (0 or 0x4000), dscale, then base-10000 digits, all int16."""
    return struct.pack(">hhHh", len(digits), weight, sign, dscale) + b"".join(struct.pack(">h", d) for d in digits)


def micros(delta):
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def array(elements, lower=1):
    if not elements:
        return b"\x00"
    out = b"\x01" + struct.pack(">iI", lower, len(elements))
    for e in elements:
        out += struct.pack(">i", -1) if e is None else struct.pack(">i", len(e)) + e
    return out


CASES = [
    # (sql literal, type name, is array, encoding, context)
    ("'123-45-6789'::text", "text", False, "123-45-6789".encode(), None),
    ("'123-45-6789'::text", "text", False, "123-45-6789".encode(), "public.patients.ssn:42"),
    ("'żółw 🐢'::text", "text", False, "żółw 🐢".encode(), ""),
    ("'\\x00ff10'::bytea", "bytea", False, bytes([0, 0xff, 0x10]), None),
    ("'{\"a\": [1, 2.5, \"x\"]}'::jsonb", "jsonb", False, b"\x01" + b'{"a": [1, 2.5, "x"]}', "accounts.profile:7"),
    ("'{\"b\":1,  \"a\":2}'::json", "json", False, b'{"b":1,  "a":2}', None),
    ("12.50::numeric", "numeric", False, numeric(0, 0, 2, [12, 5000]), None),
    ("-1234567.891::numeric", "numeric", False, numeric(0x4000, 1, 3, [123, 4567, 8910]), "ledger.amount:1"),
    ("(-2)::smallint", "smallint", False, struct.pack(">h", -2), None),
    ("2147483647::integer", "integer", False, struct.pack(">i", 2147483647), None),
    ("(-9000000000)::bigint", "bigint", False, struct.pack(">q", -9000000000), None),
    ("1.5::real", "real", False, struct.pack(">f", 1.5), None),
    ("(-0.1)::double precision", "double precision", False, struct.pack(">d", -0.1), None),
    ("true", "boolean", False, b"\x01", None),
    ("'2024-02-29'::date", "date", False,
     struct.pack(">i", (datetime.date(2024, 2, 29) - datetime.date(2000, 1, 1)).days), None),
    ("'12:34:56.789'::time", "time", False,
     struct.pack(">q", micros(datetime.timedelta(hours=12, minutes=34, seconds=56, microseconds=789000))), None),
    ("'2024-02-29 12:34:56.789'::timestamp", "timestamp", False,
     struct.pack(">q", micros(datetime.datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=datetime.timezone.utc) - EPOCH)), None),
    ("'2024-02-29 12:34:56.789+02'::timestamptz", "timestamptz", False,
     struct.pack(">q", micros(datetime.datetime(2024, 2, 29, 10, 34, 56, 789000, tzinfo=datetime.timezone.utc) - EPOCH)),
     "events.at:3"),
    ("'1 year 2 months 3 days 04:05:06.5'::interval", "interval", False,
     struct.pack(">qii", micros(datetime.timedelta(hours=4, minutes=5, seconds=6, microseconds=500000)), 3, 14), None),
    ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", "uuid", False,
     uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").bytes, None),
    # inet/cidr: family (2 = IPv4, 3 = IPv6), bits, is_cidr, address length, address.
    ("'192.168.0.1/24'::inet", "inet", False, bytes([2, 24, 0, 4, 192, 168, 0, 1]), None),
    ("'2001:db8::/32'::cidr", "cidr", False, bytes([3, 32, 1, 16]) + bytes.fromhex("20010db8" + "00" * 12), None),
    ("'08:00:2b:01:02:03'::macaddr", "macaddr", False, bytes.fromhex("08002b010203"), None),
    ("'{1,NULL,3}'::integer[]", "integer", True,
     array([struct.pack(">i", 1), None, struct.pack(">i", 3)]), "t.c:1"),
    ("'{}'::text[]", "text", True, array([]), None),
    ("'[0:1]={a,\"b c\"}'::text[]", "text", True, array([b"a", b"b c"], lower=0), None),
]


def seal(key_id, nonce, type_byte, context, plaintext):
    flags = 0 if context is None else 1
    header = bytes([2, flags, type_byte]) + key_id.to_bytes(8, "big")
    aad = header + (context.encode() if context is not None else b"")
    return header + nonce + AESGCM(KEY).encrypt(nonce, plaintext, aad)


vectors = []
for i, (sql, type_name, is_array, encoding, context) in enumerate(CASES):
    type_byte = TYPES[type_name] | (0x80 if is_array else 0)
    key_id = 7 if i % 3 else (1 << 40) + 5
    nonce = bytes((i * 12 + j) % 256 for j in range(12))
    vectors.append({
        "sql": sql,
        "type": type_name + ("[]" if is_array else ""),
        "type_byte": type_byte,
        "encoding": encoding.hex(),
        "context": context,
        "data_key": KEY.hex(),
        "key_id": key_id,
        "nonce": nonce.hex(),
        "ciphertext": seal(key_id, nonce, type_byte, context, encoding).hex(),
    })

out = {
    "comment": "Known-answer vectors of ciphertext format 2, computed by generate_v2.py with Python's cryptography and struct, independently of immuta's code.",
    "ciphertext_v2": vectors,
}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "format-v2.json"), "w") as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
    f.write("\n")
print(f"{len(vectors)} vectors")
