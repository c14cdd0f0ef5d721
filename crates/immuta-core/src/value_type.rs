//! What a format-2 value holds: its type, recorded in the header so that a reader knows how to
//! decode the plaintext before it opens the value, and refuses to read it as anything else.
//!
//! One byte: bits 0 to 6 name the scalar type ([`Scalar`]), bit 7 says "a one-dimensional array
//! of it". The numbers are part of the format (docs/FORMAT.md, section 1.2) and never change; a
//! number this build does not know is a value written by a newer immuta.

use std::fmt;

/// The scalar types immuta encrypts. The discriminant is the type byte of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Scalar {
    Text = 1,
    Bytea = 2,
    Json = 3,
    Jsonb = 4,
    Numeric = 5,
    Int2 = 6,
    Int4 = 7,
    Int8 = 8,
    Float4 = 9,
    Float8 = 10,
    Bool = 11,
    Date = 12,
    Time = 13,
    Timestamp = 14,
    Timestamptz = 15,
    Interval = 16,
    Uuid = 17,
    Inet = 18,
    Cidr = 19,
    Macaddr = 20,
    Macaddr8 = 21,
    Timetz = 22,
    Money = 23,
}

impl Scalar {
    /// Every scalar, in type-byte order.
    pub const ALL: [Scalar; 23] = [
        Scalar::Text,
        Scalar::Bytea,
        Scalar::Json,
        Scalar::Jsonb,
        Scalar::Numeric,
        Scalar::Int2,
        Scalar::Int4,
        Scalar::Int8,
        Scalar::Float4,
        Scalar::Float8,
        Scalar::Bool,
        Scalar::Date,
        Scalar::Time,
        Scalar::Timestamp,
        Scalar::Timestamptz,
        Scalar::Interval,
        Scalar::Uuid,
        Scalar::Inet,
        Scalar::Cidr,
        Scalar::Macaddr,
        Scalar::Macaddr8,
        Scalar::Timetz,
        Scalar::Money,
    ];

    pub fn from_byte(byte: u8) -> Option<Scalar> {
        Scalar::ALL.get(usize::from(byte).checked_sub(1)?).copied()
    }

    /// The PostgreSQL name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Scalar::Text => "text",
            Scalar::Bytea => "bytea",
            Scalar::Json => "json",
            Scalar::Jsonb => "jsonb",
            Scalar::Numeric => "numeric",
            Scalar::Int2 => "smallint",
            Scalar::Int4 => "integer",
            Scalar::Int8 => "bigint",
            Scalar::Float4 => "real",
            Scalar::Float8 => "double precision",
            Scalar::Bool => "boolean",
            Scalar::Date => "date",
            Scalar::Time => "time",
            Scalar::Timestamp => "timestamp",
            Scalar::Timestamptz => "timestamptz",
            Scalar::Interval => "interval",
            Scalar::Uuid => "uuid",
            Scalar::Inet => "inet",
            Scalar::Cidr => "cidr",
            Scalar::Macaddr => "macaddr",
            Scalar::Macaddr8 => "macaddr8",
            Scalar::Timetz => "timetz",
            Scalar::Money => "money",
        }
    }

    /// The length of the encoding of a type whose encoding has one length (docs/FORMAT.md,
    /// section 1.3); `None` for the others.
    pub fn fixed_len(self) -> Option<usize> {
        Some(match self {
            Scalar::Bool => 1,
            Scalar::Int2 => 2,
            Scalar::Int4 | Scalar::Float4 | Scalar::Date => 4,
            Scalar::Macaddr => 6,
            Scalar::Int8
            | Scalar::Float8
            | Scalar::Time
            | Scalar::Timestamp
            | Scalar::Timestamptz
            | Scalar::Money
            | Scalar::Macaddr8 => 8,
            Scalar::Timetz => 12,
            Scalar::Interval | Scalar::Uuid => 16,
            Scalar::Text
            | Scalar::Bytea
            | Scalar::Json
            | Scalar::Jsonb
            | Scalar::Numeric
            | Scalar::Inet
            | Scalar::Cidr => return None,
        })
    }
}

/// The type a value holds: a scalar, or a one-dimensional array of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ValueType {
    pub scalar: Scalar,
    pub array: bool,
}

const ARRAY_BIT: u8 = 0x80;

impl ValueType {
    pub const TEXT: ValueType = ValueType { scalar: Scalar::Text, array: false };

    pub const fn scalar(scalar: Scalar) -> ValueType {
        ValueType { scalar, array: false }
    }

    pub const fn array_of(scalar: Scalar) -> ValueType {
        ValueType { scalar, array: true }
    }

    /// The type byte of the format.
    pub fn to_byte(self) -> u8 {
        self.scalar as u8 | if self.array { ARRAY_BIT } else { 0 }
    }

    /// The type named by a type byte, if this build knows it.
    pub fn from_byte(byte: u8) -> Option<ValueType> {
        Some(ValueType { scalar: Scalar::from_byte(byte & !ARRAY_BIT)?, array: byte & ARRAY_BIT != 0 })
    }

    /// How the type is written in SQL (`jsonb`, `integer[]`), also what reads it:
    /// `NULL::<sql_name>`.
    pub fn sql_name(self) -> String {
        if self.array {
            format!("{}[]", self.scalar.name())
        } else {
            self.scalar.name().to_owned()
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sql_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_byte_round_trips_and_no_two_types_share_one() {
        let mut seen = std::collections::HashSet::new();
        for scalar in Scalar::ALL {
            for t in [ValueType::scalar(scalar), ValueType::array_of(scalar)] {
                assert_eq!(ValueType::from_byte(t.to_byte()), Some(t));
                assert!(seen.insert(t.to_byte()));
            }
        }
        assert_eq!(ValueType::TEXT.to_byte(), 1);
        assert_eq!(ValueType::array_of(Scalar::Int4).to_byte(), 0x87);
    }

    #[test]
    fn unknown_type_bytes_are_none() {
        for byte in [0u8, 24, 0x7f, 0x80, 0x98, 0xff] {
            assert_eq!(ValueType::from_byte(byte), None, "{byte:#x}");
        }
    }

    #[test]
    fn names_read_as_sql() {
        assert_eq!(ValueType::array_of(Scalar::Float8).sql_name(), "double precision[]");
        assert_eq!(ValueType::scalar(Scalar::Jsonb).to_string(), "jsonb");
    }
}
