//! Values of every type immuta encrypts, to and from the encodings that format 2 seals
//! (docs/FORMAT.md, section 1.3): which SQL types are which [`ValueType`], and the conversions.
//!
//! The encodings never depend on session settings (DateStyle, TimeZone, IntervalStyle,
//! extra_float_digits, bytea_output, lc_monetary, client_encoding): they are PostgreSQL's binary
//! send formats, which do not, except for the text-like types, whose send functions convert to
//! the client's encoding, so immuta takes their UTF-8 bytes itself (jsonb as its canonical text,
//! after a version byte, as `jsonb_send` would in a UTF-8 client).
//!
//! Decoding goes through the type's own receive or input function wherever a type has invalid
//! encodings (dates out of range, malformed numerics, JSON), so a value made outside immuta with
//! the data key is an error, never a wrong value; the core has already checked widths and text.
//! The hot types (integers, floats, booleans, dates and times, uuid, text, bytea) are converted
//! here directly, without a function call, dates and times checked against PostgreSQL's ranges
//! by the core as their receive functions would.

use std::cell::RefCell;
use std::collections::HashMap;

use immuta_core::encoding::{self, JSONB_VERSION};
use immuta_core::value_type::{Scalar, ValueType};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::PgSqlErrorCode;

use crate::buffer::SecretBuf;
use crate::errors::raise;

/// The SQL type of each scalar (the one a value is decoded to unless the caller asks for a
/// binary-compatible one, such as `varchar` for text).
fn oid_of(scalar: Scalar) -> Oid {
    match scalar {
        Scalar::Text => pg_sys::TEXTOID,
        Scalar::Bytea => pg_sys::BYTEAOID,
        Scalar::Json => pg_sys::JSONOID,
        Scalar::Jsonb => pg_sys::JSONBOID,
        Scalar::Numeric => pg_sys::NUMERICOID,
        Scalar::Int2 => pg_sys::INT2OID,
        Scalar::Int4 => pg_sys::INT4OID,
        Scalar::Int8 => pg_sys::INT8OID,
        Scalar::Float4 => pg_sys::FLOAT4OID,
        Scalar::Float8 => pg_sys::FLOAT8OID,
        Scalar::Bool => pg_sys::BOOLOID,
        Scalar::Date => pg_sys::DATEOID,
        Scalar::Time => pg_sys::TIMEOID,
        Scalar::Timestamp => pg_sys::TIMESTAMPOID,
        Scalar::Timestamptz => pg_sys::TIMESTAMPTZOID,
        Scalar::Interval => pg_sys::INTERVALOID,
        Scalar::Uuid => pg_sys::UUIDOID,
        Scalar::Inet => pg_sys::INETOID,
        Scalar::Cidr => pg_sys::CIDROID,
        Scalar::Macaddr => pg_sys::MACADDROID,
        Scalar::Macaddr8 => pg_sys::MACADDR8OID,
        Scalar::Timetz => pg_sys::TIMETZOID,
        Scalar::Money => pg_sys::MONEYOID,
    }
}

/// The scalar a (base) type is; `varchar` and `char(n)` are text.
fn scalar_of(oid: Oid) -> Option<Scalar> {
    if oid == pg_sys::VARCHAROID || oid == pg_sys::BPCHAROID {
        return Some(Scalar::Text);
    }
    Scalar::ALL.into_iter().find(|&s| oid_of(s) == oid)
}

/// What immuta knows of an SQL type it encrypts or decrypts to.
#[derive(Clone, Copy)]
pub struct SqlType {
    pub value_type: ValueType,
    /// The type asked for is a domain, or an array of one.
    domain: bool,
    /// The type itself (for an array, the element type): what decoding builds.
    elem: Oid,
    elem_len: i16,
    elem_byval: bool,
    elem_align: std::ffi::c_char,
}

thread_local! {
    /// Types resolved so far; only built-in ones are kept (their OIDs and definitions never
    /// change), so the hot path looks a type up without a catalog lookup.
    static TYPES: RefCell<HashMap<Oid, SqlType>> = RefCell::new(HashMap::new());
    /// I/O functions of the scalars that use them, looked up once per backend.
    static FUNCTIONS: RefCell<HashMap<(Scalar, Io), Box<pg_sys::FmgrInfo>>> = RefCell::new(HashMap::new());
}

/// The [`SqlType`] of `oid` (domains resolved to their base type), or an error naming the types
/// immuta encrypts.
pub fn sql_type(oid: Oid) -> SqlType {
    if let Some(t) = TYPES.with_borrow(|types| types.get(&oid).copied()) {
        return t;
    }
    let resolved = resolve(oid).unwrap_or_else(|| unsupported(oid));
    if oid.to_u32() < pg_sys::FirstNormalObjectId {
        TYPES.with_borrow_mut(|types| types.insert(oid, resolved));
    }
    resolved
}

/// The SQL type and [`SqlType`] of argument `argno` of this call, resolved at the first row and
/// kept in the call's `fn_extra` for the rest of the query: a query over a million rows resolves
/// it once, with no type lookup per row. A call without `flinfo` (none from SQL) resolves it every
/// time.
pub fn of_argument(fcinfo: pg_sys::FunctionCallInfo, argno: i32) -> (Oid, SqlType) {
    // SAFETY: fcinfo is the current call's; its flinfo, when set, is the FmgrInfo of this call
    // site, whose fn_extra belongs to the function called (immuta's own: none of these functions
    // returns a set, the only case where pgrx uses fn_extra) and whose fn_mcxt lives as long as
    // the FmgrInfo. What fn_extra points to is written once, here, as an `(Oid, SqlType)` in
    // fn_mcxt (palloc aligns to 8, enough for it), and only ever read back as one.
    unsafe {
        let flinfo = (*fcinfo).flinfo;
        if !flinfo.is_null() && !(*flinfo).fn_extra.is_null() {
            return *(*flinfo).fn_extra.cast::<(Oid, SqlType)>();
        }
        let oid = pg_sys::get_fn_expr_argtype(flinfo, argno);
        let resolved = (oid, sql_type(oid));
        if !flinfo.is_null() {
            let slot = pg_sys::MemoryContextAlloc((*flinfo).fn_mcxt, std::mem::size_of::<(Oid, SqlType)>());
            slot.cast::<(Oid, SqlType)>().write(resolved);
            (*flinfo).fn_extra = slot;
        }
        resolved
    }
}

fn resolve(oid: Oid) -> Option<SqlType> {
    // SAFETY: catalog lookups by OID; they raise ERROR for an OID that is no type.
    let base = unsafe { pg_sys::getBaseType(oid) };
    let (array, elem, domain) = match scalar_of(base) {
        Some(_) => (false, base, base != oid),
        None => {
            // SAFETY: as above.
            let elem = unsafe { pg_sys::get_element_type(base) };
            // Only a true array type: the array type of its element. (int2vector and oidvector
            // also have an element type, but a layout of their own.)
            // SAFETY: as above.
            if elem == pg_sys::InvalidOid || unsafe { pg_sys::get_array_type(elem) } != base {
                return None;
            }
            // SAFETY: as above, for the element type.
            let elem_base = unsafe { pg_sys::getBaseType(elem) };
            (true, elem_base, base != oid || elem_base != elem)
        }
    };
    let scalar = scalar_of(elem)?;
    let (mut elem_len, mut elem_byval, mut elem_align) = (0i16, false, 0 as std::ffi::c_char);
    // SAFETY: fills the three out-parameters for a type that exists.
    unsafe { pg_sys::get_typlenbyvalalign(elem, &mut elem_len, &mut elem_byval, &mut elem_align) };
    Some(SqlType { value_type: ValueType { scalar, array }, domain, elem, elem_len, elem_byval, elem_align })
}

/// Decrypting to a domain would return a value of the domain that its constraints never
/// checked: immuta decrypts to the base type, and a cast checks them.
pub fn refuse_domain(t: &SqlType, oid: Oid) {
    if t.domain {
        // SAFETY: format_type_be returns a palloc'd C string naming any type OID.
        let name =
            unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(oid)) }.to_string_lossy().into_owned();
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("immuta decrypts to base types, not to the domain {name}"),
            Some("A value decrypted as a domain would skip the domain's constraints.".into()),
            Some(&format!(
                "Decrypt as the base type and cast: immuta_decrypt(ciphertext, NULL::{})::{name}.",
                t.value_type
            )),
        );
    }
}

fn unsupported(oid: Oid) -> ! {
    // SAFETY: format_type_be returns a palloc'd C string naming any type OID.
    let name =
        unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(oid)) }.to_string_lossy().into_owned();
    let list: Vec<&str> = Scalar::ALL.iter().map(|s| s.name()).collect();
    raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("immuta does not encrypt values of type {name}"),
        Some(format!(
            "immuta encrypts {} (and varchar and char as text), and one-dimensional arrays of them.",
            list.join(", ")
        )),
        Some("Cast the value to one of these types (for example to text or jsonb) first."),
    )
}

/// Which of a type's I/O functions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Io {
    Send,
    Receive,
    Output,
    Input,
}

/// An I/O function of a scalar's type, looked up once per backend; the FmgrInfo lives as long as
/// the backend (what fmgr_info_cxt allocates goes to TopMemoryContext).
fn with_function<R>(scalar: Scalar, io: Io, f: impl FnOnce(*mut pg_sys::FmgrInfo) -> R) -> R {
    let ptr = FUNCTIONS.with_borrow_mut(|functions| {
        let info = functions.entry((scalar, io)).or_insert_with(|| {
            let (mut function, mut other) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            let mut is_varlena = false;
            let oid = oid_of(scalar);
            // SAFETY: catalog lookups for a built-in type; fmgr_info_cxt fills the FmgrInfo we own
            // and keeps what it allocates in TopMemoryContext, which lives as long as the backend.
            unsafe {
                match io {
                    Io::Send => pg_sys::getTypeBinaryOutputInfo(oid, &mut function, &mut is_varlena),
                    Io::Receive => pg_sys::getTypeBinaryInputInfo(oid, &mut function, &mut other),
                    Io::Output => pg_sys::getTypeOutputInfo(oid, &mut function, &mut is_varlena),
                    Io::Input => pg_sys::getTypeInputInfo(oid, &mut function, &mut other),
                }
                let mut info = Box::new(std::mem::zeroed::<pg_sys::FmgrInfo>());
                pg_sys::fmgr_info_cxt(function, info.as_mut(), pg_sys::TopMemoryContext);
                info
            }
        });
        info.as_mut() as *mut pg_sys::FmgrInfo
    });
    // The box never moves or is freed while the backend runs: the pointer stays valid.
    f(ptr)
}

/// Calls `f` with the encoding of `datum`, a non-NULL value of scalar `scalar`.
fn with_encoding<R>(scalar: Scalar, datum: Datum, f: impl FnOnce(&[u8]) -> R) -> R {
    let v = datum.value() as u64;
    match scalar {
        Scalar::Text | Scalar::Bytea | Scalar::Json => {
            // SAFETY: the datum is a varlena of this type; detoasting returns it, or a
            // detoasted copy in the current memory context, and the slice is read before
            // either goes away.
            unsafe {
                let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                f(pgrx::varlena::varlena_to_byte_slice(detoasted))
            }
        }
        Scalar::Jsonb => {
            // SAFETY: jsonb's output function takes a jsonb datum and returns a palloc'd C
            // string: the canonical text of the value, which depends on no setting.
            let text = with_function(scalar, Io::Output, |output| unsafe {
                std::ffi::CStr::from_ptr(pg_sys::OutputFunctionCall(output, datum))
            });
            let mut bytes = SecretBuf::with_capacity(text.to_bytes().len() + 1);
            bytes.extend(&[JSONB_VERSION]);
            bytes.extend(text.to_bytes());
            f(bytes.as_slice())
        }
        Scalar::Bool => f(&[u8::from(v & 0xff != 0)]),
        Scalar::Int2 => f(&(v as i16).to_be_bytes()),
        Scalar::Int4 | Scalar::Date => f(&(v as i32).to_be_bytes()),
        Scalar::Float4 => f(&(v as u32).to_be_bytes()),
        Scalar::Int8
        | Scalar::Float8
        | Scalar::Time
        | Scalar::Timestamp
        | Scalar::Timestamptz
        | Scalar::Money => f(&v.to_be_bytes()),
        Scalar::Uuid => {
            // SAFETY: a uuid datum points to its 16 bytes.
            f(unsafe { std::slice::from_raw_parts(datum.cast_mut_ptr::<u8>(), 16) })
        }
        Scalar::Numeric
        | Scalar::Interval
        | Scalar::Inet
        | Scalar::Cidr
        | Scalar::Macaddr
        | Scalar::Macaddr8
        | Scalar::Timetz => with_function(scalar, Io::Send, |send| {
            // SAFETY: the type's send function takes its datum and returns a palloc'd bytea.
            unsafe {
                let sent = pg_sys::SendFunctionCall(send, datum);
                f(pgrx::varlena::varlena_to_byte_slice(sent.cast()))
            }
        }),
    }
}

/// Calls `f` with the encoding of the non-NULL value `datum` of SQL type `t`.
pub fn encode<R>(t: &SqlType, datum: Datum, f: impl FnOnce(&[u8]) -> R) -> R {
    if !t.value_type.array {
        return with_encoding(t.value_type.scalar, datum, f);
    }
    // SAFETY: the datum is an array of element type `t.elem`; it is detoasted into the current
    // memory context, and its dimensions and elements are read through PostgreSQL's own
    // functions with the element type's length, by-value flag and alignment.
    let out = unsafe {
        let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let ndim = (*array).ndim;
        if ndim > 1 {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("immuta encrypts one-dimensional arrays only, not arrays of {ndim} dimensions"),
                None,
                Some("Encrypt each row of the array, or the array as jsonb (to_jsonb(value))."),
            );
        }
        let (mut elems, mut nulls, mut count) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
        pg_sys::deconstruct_array(
            array,
            t.elem,
            t.elem_len.into(),
            t.elem_byval,
            t.elem_align,
            &mut elems,
            &mut nulls,
            &mut count,
        );
        let count = count as usize;
        if count == 0 {
            let mut out = SecretBuf::with_capacity(1);
            out.extend(&[0]);
            out
        } else {
            let lower =
                *array.cast::<u8>().add(std::mem::size_of::<pg_sys::ArrayType>()).cast::<i32>().add(1);
            // The array's own size is a good first guess at its encoding's.
            let size = pgrx::varlena::varsize_any(array.cast());
            let mut out = SecretBuf::with_capacity(9 + size.saturating_add(4 * count));
            out.extend(&encoding::array_header(lower, count));
            for i in 0..count {
                pgrx::check_for_interrupts!();
                if *nulls.add(i) {
                    out.extend(&encoding::element_prefix(None));
                } else {
                    with_encoding(t.value_type.scalar, *elems.add(i), |bytes| {
                        out.extend(&encoding::element_prefix(Some(bytes.len())));
                        out.extend(bytes);
                    });
                }
            }
            out
        }
    };
    f(out.as_slice())
}

/// A plaintext that does not decode: only a value made outside immuta with the data key.
fn invalid(value_type: ValueType) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
        format!("immuta decrypted value is not a valid {value_type}"),
        Some(format!("The value authenticated, but its bytes are not an encoding of {value_type}.")),
        Some("Only values produced by immuta_encrypt() decrypt; this one was made otherwise with the data key."),
    )
}

/// A new varlena holding `bytes`, in the current memory context.
fn varlena_of(bytes: &[u8]) -> Datum {
    crate::varlena::datum(bytes.len(), |out| out.copy_from_slice(bytes))
}

/// Decodes one scalar from `bytes`, which the core has checked (width, text) and which must be
/// followed by one NUL byte (`with_nul` is `bytes` and that byte), into a datum of the scalar's
/// type (or a binary-compatible one) in the current memory context.
fn decode_scalar(scalar: Scalar, with_nul: &mut [u8]) -> Datum {
    let len = with_nul.len() - 1;
    debug_assert_eq!(with_nul[len], 0);
    let bytes = &with_nul[..len];
    let be8 = || u64::from_be_bytes(bytes.try_into().expect("width checked"));
    match scalar {
        Scalar::Text | Scalar::Bytea => varlena_of(bytes),
        Scalar::Json | Scalar::Jsonb => {
            // jsonb's encoding starts with its version byte, checked by the core.
            let text = if scalar == Scalar::Json { &mut with_nul[..] } else { &mut with_nul[1..] };
            // SAFETY: the input function reads a NUL-terminated string (checked to be UTF-8
            // without NUL inside) and returns a new value, or raises ERROR for invalid JSON.
            with_function(scalar, Io::Input, |input| unsafe {
                pg_sys::InputFunctionCall(input, text.as_mut_ptr().cast(), oid_of(scalar), -1)
            })
        }
        // The core has checked these against PostgreSQL's ranges (encoding::check_scalar).
        Scalar::Bool => Datum::from(bytes[0] == 1),
        Scalar::Int2 => Datum::from(i16::from_be_bytes(bytes.try_into().expect("width checked"))),
        Scalar::Int4 | Scalar::Date => {
            Datum::from(i32::from_be_bytes(bytes.try_into().expect("width checked")))
        }
        Scalar::Float4 => Datum::from(u32::from_be_bytes(bytes.try_into().expect("width checked")) as usize),
        Scalar::Int8
        | Scalar::Float8
        | Scalar::Money
        | Scalar::Time
        | Scalar::Timestamp
        | Scalar::Timestamptz => Datum::from(be8() as i64),
        Scalar::Uuid => {
            // SAFETY: palloc returns 16 writable bytes in the current memory context, which is
            // where a uuid datum must live.
            unsafe {
                let ptr = pg_sys::palloc(16).cast::<u8>();
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, 16);
                Datum::from(ptr)
            }
        }
        Scalar::Numeric
        | Scalar::Interval
        | Scalar::Inet
        | Scalar::Cidr
        | Scalar::Macaddr
        | Scalar::Macaddr8
        | Scalar::Timetz => with_function(scalar, Io::Receive, |receive| {
            let mut buf = pg_sys::StringInfoData {
                data: with_nul.as_mut_ptr().cast(),
                len: len as i32,
                maxlen: with_nul.len() as i32,
                cursor: 0,
            };
            // SAFETY: the receive function reads the NUL-terminated buffer and returns a new
            // value, or raises ERROR for an invalid one, or one it did not read to the end
            // ("incorrect binary data format").
            unsafe { pg_sys::ReceiveFunctionCall(receive, &mut buf, oid_of(scalar), -1) }
        }),
    }
}

/// Decodes the plaintext of a value of SQL type `t`; `with_nul` is the plaintext followed by one
/// NUL byte. The result is a datum of `t` in the current memory context.
pub fn decode(t: &SqlType, with_nul: &mut [u8]) -> Datum {
    let scalar = t.value_type.scalar;
    if !t.value_type.array {
        return decode_scalar(scalar, with_nul);
    }
    let len = with_nul.len() - 1;
    let mut reader =
        encoding::read_array(&with_nul[..len], scalar.fixed_len()).unwrap_or_else(|_| invalid(t.value_type));
    let count = reader.count;
    if count == 0 {
        // SAFETY: makes an empty array of an existing element type.
        return Datum::from(unsafe { pg_sys::construct_empty_array(t.elem) });
    }
    let lower = reader.lower;
    // The element datums and NULL flags in palloc'd memory (an ERROR, never an abort, when the
    // count is more than memory allows; the count is at most PostgreSQL's MaxArraySize).
    // SAFETY: palloc0 returns zeroed memory for `count` datums and flags, or raises ERROR.
    let (datums, nulls) = unsafe {
        (
            pg_sys::palloc0(count * std::mem::size_of::<Datum>()).cast::<Datum>(),
            pg_sys::palloc0(count).cast::<bool>(),
        )
    };
    let mut element_buf = SecretBuf::new();
    for i in 0..count {
        pgrx::check_for_interrupts!();
        let element = reader.next().expect("count elements").unwrap_or_else(|_| invalid(t.value_type));
        match element {
            // SAFETY: i < count, within both allocations.
            None => unsafe { *nulls.add(i) = true },
            Some(bytes) => {
                if encoding::check_scalar(ValueType::scalar(scalar), bytes).is_err() {
                    invalid(t.value_type);
                }
                // Each element followed by a NUL, as the receive functions expect.
                element_buf = SecretBuf::with_capacity(bytes.len() + 1);
                element_buf.extend(bytes);
                element_buf.extend(&[0]);
                let datum = decode_scalar(scalar, element_buf.as_mut_slice());
                // SAFETY: i < count.
                unsafe { *datums.add(i) = datum };
            }
        }
    }
    drop(element_buf);
    reader.finish().unwrap_or_else(|_| invalid(t.value_type));
    let mut dims = [count as i32];
    let mut lbs = [lower];
    // SAFETY: builds a one-dimensional array of `count` elements of an existing type from datums
    // of that type; PostgreSQL checks the size and the bounds.
    Datum::from(unsafe {
        pg_sys::construct_md_array(
            datums,
            nulls,
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            t.elem,
            t.elem_len.into(),
            t.elem_byval,
            t.elem_align,
        )
    })
}
