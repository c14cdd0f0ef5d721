//! How a value's bytes are laid out inside a format-2 ciphertext, where the SQL layer does not
//! simply use PostgreSQL's binary form of the type: the framing of arrays, and the checks on a
//! decrypted plaintext that hold for every type (docs/FORMAT.md, section 1.3).
//!
//! The encodings of the scalar types themselves are PostgreSQL's binary ("send") formats, except
//! for the text-like types, which are UTF-8 (`src/typed.rs` does the conversions).
//!
//! An array is one byte of dimensions, 0 (empty) or 1; for one dimension, the lower bound (int32)
//! and the element count (uint32), then each element as an int32 length (-1 for NULL) and its
//! bytes. Everything is checked against the bytes actually there before anything is allocated.

use crate::value_type::{Scalar, ValueType};

/// Why a plaintext does not decode as the type its header names. Only a value made outside
/// immuta with the data key can be like this: immuta's own values always decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidEncoding;

/// An array's elements, borrowed from the plaintext.
#[derive(Debug, PartialEq, Eq)]
pub struct ArrayParts<'a> {
    /// The lower bound of the dimension (1 unless the array was made otherwise); 1 when empty.
    pub lower: i32,
    pub elements: Vec<Option<&'a [u8]>>,
}

/// Appends the encoding of a one-dimensional array (or an empty one: no elements) to `out`.
pub fn encode_array<'a>(
    lower: i32,
    elements: impl ExactSizeIterator<Item = Option<&'a [u8]>>,
    out: &mut Vec<u8>,
) {
    if elements.len() == 0 {
        out.push(0);
        return;
    }
    out.extend_from_slice(&array_header(lower, elements.len()));
    for element in elements {
        out.extend_from_slice(&element_prefix(element.map(<[u8]>::len)));
        out.extend_from_slice(element.unwrap_or_default());
    }
}

/// The most elements a PostgreSQL array may have (`MaxArraySize`).
pub const MAX_ARRAY_ELEMENTS: usize = 134_217_727;

/// The fixed part of a one-dimensional array's encoding: dimensions, lower bound, count.
pub fn array_header(lower: i32, count: usize) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = 1;
    out[1..5].copy_from_slice(&lower.to_be_bytes());
    out[5..9]
        .copy_from_slice(&u32::try_from(count).expect("arrays have fewer than 2^32 elements").to_be_bytes());
    out
}

/// The length prefix of one element (`None`: NULL).
pub fn element_prefix(len: Option<usize>) -> [u8; 4] {
    match len {
        None => (-1i32).to_be_bytes(),
        Some(len) => i32::try_from(len).expect("PostgreSQL values are below 1 GB").to_be_bytes(),
    }
}

/// Reads the elements of an array's encoding one at a time, checking each against the bytes
/// there before the caller allocates anything for it: no allocation here, whatever the count
/// says. After the last element, [`ArrayReader::finish`] checks that nothing follows.
pub struct ArrayReader<'a> {
    /// The lower bound of the dimension (1 when empty).
    pub lower: i32,
    /// The number of elements, at most [`MAX_ARRAY_ELEMENTS`].
    pub count: usize,
    rest: &'a [u8],
    fixed_len: Option<usize>,
    left: usize,
}

/// Starts reading an array written by [`encode_array`]; every element of a fixed-width type
/// must have that width (`fixed_len`).
pub fn read_array(bytes: &[u8], fixed_len: Option<usize>) -> Result<ArrayReader<'_>, InvalidEncoding> {
    let (&ndim, rest) = bytes.split_first().ok_or(InvalidEncoding)?;
    match ndim {
        0 if rest.is_empty() => return Ok(ArrayReader { lower: 1, count: 0, rest, fixed_len, left: 0 }),
        1 => {}
        _ => return Err(InvalidEncoding),
    }
    let (lower, rest) = take_i32(rest)?;
    let (count, rest) = take_i32(rest)?;
    let count = u32::from_be_bytes(count.to_be_bytes()) as usize;
    // Each element takes at least its 4-byte length; PostgreSQL's limits on the count and on the
    // last subscript hold too.
    if count == 0
        || count > MAX_ARRAY_ELEMENTS
        || count > rest.len() / 4
        || i64::from(lower) + count as i64 - 1 > i64::from(i32::MAX)
    {
        return Err(InvalidEncoding);
    }
    Ok(ArrayReader { lower, count, rest, fixed_len, left: count })
}

impl<'a> Iterator for ArrayReader<'a> {
    type Item = Result<Option<&'a [u8]>, InvalidEncoding>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(self.element())
    }
}

impl<'a> ArrayReader<'a> {
    fn element(&mut self) -> Result<Option<&'a [u8]>, InvalidEncoding> {
        let (len, after) = take_i32(self.rest)?;
        if len == -1 {
            self.rest = after;
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| InvalidEncoding)?;
        if len > after.len() || self.fixed_len.is_some_and(|f| f != len) {
            return Err(InvalidEncoding);
        }
        let (element, after) = after.split_at(len);
        self.rest = after;
        Ok(Some(element))
    }

    /// After every element was read: nothing may follow.
    pub fn finish(self) -> Result<(), InvalidEncoding> {
        if self.left == 0 && self.rest.is_empty() {
            Ok(())
        } else {
            Err(InvalidEncoding)
        }
    }
}

/// Reads a whole array (for callers that want every element at once, such as tests).
pub fn decode_array(bytes: &[u8], fixed_len: Option<usize>) -> Result<ArrayParts<'_>, InvalidEncoding> {
    let mut reader = read_array(bytes, fixed_len)?;
    let lower = reader.lower;
    let elements = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
    reader.finish()?;
    Ok(ArrayParts { lower, elements })
}

fn take_i32(bytes: &[u8]) -> Result<(i32, &[u8]), InvalidEncoding> {
    if bytes.len() < 4 {
        return Err(InvalidEncoding);
    }
    let (head, rest) = bytes.split_at(4);
    Ok((i32::from_be_bytes(head.try_into().expect("4 bytes")), rest))
}

/// The checks every plaintext of `value_type` must pass whatever decodes it afterwards: the width
/// of a fixed-width scalar, UTF-8 without NUL bytes for the text-like types (PostgreSQL's text
/// cannot hold NUL), the version byte of jsonb's encoding.
pub fn check_scalar(value_type: ValueType, bytes: &[u8]) -> Result<(), InvalidEncoding> {
    use crate::value_type::Scalar::*;
    debug_assert!(!value_type.array);
    let scalar = value_type.scalar;
    if let Some(len) = scalar.fixed_len() {
        if bytes.len() != len {
            return Err(InvalidEncoding);
        }
        return check_range(scalar, bytes);
    }
    match scalar {
        Text | Json => check_text(bytes),
        Jsonb => match bytes.split_first() {
            Some((&JSONB_VERSION, text)) => check_text(text),
            _ => Err(InvalidEncoding),
        },
        _ => Ok(()),
    }
}

/// PostgreSQL's ranges of the fixed-size types whose binary forms have invalid values, exactly
/// as their receive functions check them (`date_recv`, `time_recv`, `timestamp_recv`,
/// `timestamptz_recv`; the same in PostgreSQL 13 to 18), so that the SQL layer can build these
/// values without calling them; and booleans are 0 or 1.
fn check_range(scalar: Scalar, bytes: &[u8]) -> Result<(), InvalidEncoding> {
    // Days and microseconds from 2000-01-01, PostgreSQL's epoch; infinity is the largest value
    // and -infinity the smallest.
    const POSTGRES_EPOCH_JDATE: i64 = 2_451_545;
    const DATE_END_JULIAN: i64 = 2_147_483_494;
    const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
    const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
    const USECS_PER_DAY: i64 = 86_400_000_000;
    let be4 = || i64::from(i32::from_be_bytes(bytes.try_into().expect("width checked")));
    let be8 = || i64::from_be_bytes(bytes.try_into().expect("width checked"));
    let ok = match scalar {
        Scalar::Bool => bytes[0] <= 1,
        Scalar::Date => {
            let d = be4();
            d == i64::from(i32::MIN)
                || d == i64::from(i32::MAX)
                || (-POSTGRES_EPOCH_JDATE..DATE_END_JULIAN - POSTGRES_EPOCH_JDATE).contains(&d)
        }
        Scalar::Time => (0..=USECS_PER_DAY).contains(&be8()),
        Scalar::Timestamp | Scalar::Timestamptz => {
            let t = be8();
            t == i64::MIN || t == i64::MAX || (MIN_TIMESTAMP..END_TIMESTAMP).contains(&t)
        }
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(InvalidEncoding)
    }
}

/// The first byte of a jsonb value's encoding (as in PostgreSQL's `jsonb_send`).
pub const JSONB_VERSION: u8 = 1;

/// UTF-8 without NUL bytes. `simdutf8` validates with SIMD instructions chosen at run time
/// (half the cost of `std::str::from_utf8` on a 1 kB value here, two thirds on 96 bytes);
/// its answer is the standard library's, which the tests compare.
pub fn check_text(bytes: &[u8]) -> Result<(), InvalidEncoding> {
    if bytes.contains(&0) || simdutf8::basic::from_utf8(bytes).is_err() {
        return Err(InvalidEncoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value_type::Scalar;

    fn encode(lower: i32, elements: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_array(lower, elements.iter().copied(), &mut out);
        out
    }

    #[test]
    fn arrays_round_trip_with_nulls_bounds_and_empty_elements() {
        for (lower, elements) in [
            (1, vec![Some(&b"a"[..]), None, Some(b"")]),
            (-3, vec![None]),
            (1, vec![]),
            (i32::MAX, vec![Some(&b"last"[..])]),
        ] {
            let bytes = encode(lower, &elements);
            let parts = decode_array(&bytes, None).unwrap();
            assert_eq!(parts.elements, elements);
            if !elements.is_empty() {
                assert_eq!(parts.lower, lower);
            }
        }
        assert_eq!(encode(1, &[]), [0]);
        assert_eq!(
            encode(1, &[Some(b"ab"), None]),
            [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn malformed_arrays_are_refused_before_allocating() {
        let good = encode(1, &[Some(b"abcd"), None]);
        for cut in 0..good.len() {
            assert_eq!(decode_array(&good[..cut], None), Err(InvalidEncoding), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode_array(&trailing, None), Err(InvalidEncoding));
        // A count of 2^32-1 with a few bytes: refused by the count check, not by running out.
        assert_eq!(
            decode_array(&[1, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], None),
            Err(InvalidEncoding)
        );
        // Two dimensions, a zero count, a negative length other than -1, an overflowing bound.
        assert_eq!(decode_array(&[2], None), Err(InvalidEncoding));
        assert_eq!(decode_array(&[1, 0, 0, 0, 1, 0, 0, 0, 0], None), Err(InvalidEncoding));
        assert_eq!(
            decode_array(&[1, 0, 0, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe], None),
            Err(InvalidEncoding)
        );
        assert_eq!(decode_array(&encode(i32::MAX, &[None, None]), None), Err(InvalidEncoding));
        // A fixed-width element of another width.
        assert_eq!(decode_array(&encode(1, &[Some(b"abc")]), Some(4)), Err(InvalidEncoding));
    }

    #[test]
    fn scalars_are_checked_for_width_and_text() {
        assert!(check_scalar(ValueType::scalar(Scalar::Int4), &[0; 4]).is_ok());
        assert!(check_scalar(ValueType::scalar(Scalar::Int4), &[0; 5]).is_err());
        assert!(check_scalar(ValueType::scalar(Scalar::Text), "żółw".as_bytes()).is_ok());
        assert!(check_scalar(ValueType::scalar(Scalar::Text), b"a\0b").is_err());
        assert!(check_scalar(ValueType::scalar(Scalar::Json), b"\xff").is_err());
        assert!(check_scalar(ValueType::scalar(Scalar::Jsonb), b"\x01{}").is_ok());
        assert!(check_scalar(ValueType::scalar(Scalar::Jsonb), b"\x02{}").is_err());
        assert!(check_scalar(ValueType::scalar(Scalar::Jsonb), b"").is_err());
        assert!(check_scalar(ValueType::scalar(Scalar::Bytea), b"\0\xff").is_ok());
    }

    #[test]
    fn dates_and_times_are_held_to_postgresqls_ranges() {
        let date = |d: i32| check_scalar(ValueType::scalar(Scalar::Date), &d.to_be_bytes()).is_ok();
        assert!(date(0) && date(i32::MIN) && date(i32::MAX) && date(-2_451_545) && date(2_145_031_948));
        assert!(!date(-2_451_546) && !date(2_145_031_949));
        let ts = |t: i64| check_scalar(ValueType::scalar(Scalar::Timestamptz), &t.to_be_bytes()).is_ok();
        assert!(ts(0) && ts(i64::MIN) && ts(i64::MAX) && ts(-211_813_488_000_000_000));
        assert!(!ts(-211_813_488_000_000_001) && !ts(9_223_371_331_200_000_000));
        let time = |t: i64| check_scalar(ValueType::scalar(Scalar::Time), &t.to_be_bytes()).is_ok();
        assert!(time(0) && time(86_400_000_000) && !time(-1) && !time(86_400_000_001));
        let boolean = |b: u8| check_scalar(ValueType::scalar(Scalar::Bool), &[b]).is_ok();
        assert!(boolean(0) && boolean(1) && !boolean(2));
    }

    proptest::proptest! {
        /// The SIMD validator agrees with the standard library on arbitrary bytes and on valid
        /// text with one byte changed (which reaches every kind of broken sequence).
        #[test]
        fn text_is_checked_exactly_as_the_standard_library_would(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            text in "\\PC{0,120}",
            at in 0usize..512,
            byte in proptest::num::u8::ANY,
        ) {
            let expected = |b: &[u8]| !b.contains(&0) && std::str::from_utf8(b).is_ok();
            proptest::prop_assert_eq!(check_text(&bytes).is_ok(), expected(&bytes));
            let mut mutated = text.into_bytes();
            if !mutated.is_empty() {
                let i = at % mutated.len();
                mutated[i] = byte;
            }
            proptest::prop_assert_eq!(check_text(&mutated).is_ok(), expected(&mutated));
        }
    }
}
