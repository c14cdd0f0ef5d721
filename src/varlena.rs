//! `bytea`/`text` arguments read in place, and results built in place.
//!
//! The hot functions seal and open straight into the varlena they return instead of into a Rust
//! vector that pgrx would then copy: one allocation and one copy fewer per row (memmove and malloc
//! were 8% of an encrypt/decrypt profile). Their arguments are borrowed where PostgreSQL stored
//! them, without a call into PostgreSQL unless a value is compressed or out of line.

use std::ops::Deref;

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::{impl_sql_translatable, pg_sys, FromDatum, PgSqlErrorCode};

use crate::errors::raise;

/// A `bytea` result built by [`build`].
pub struct Bytea(pg_sys::Datum);
/// A `text` result built by [`build`] from checked UTF-8.
pub struct Text(pg_sys::Datum);

/// The bytes of a `bytea` or `text` argument (the SQL of each function says which).
///
/// pgrx's `&[u8]` calls `pg_detoast_datum_packed` for every value, through a guard that costs a
/// `sigsetjmp` (4% of a decryption); a value stored inline and uncompressed, as every ciphertext,
/// plaintext and context of a few kilobytes is, needs no call at all: it is read where it lies,
/// exactly as that function would return it. Other values are detoasted as before.
pub struct Bytes<'a>(&'a [u8]);

impl Deref for Bytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0
    }
}

impl FromDatum for Bytes<'_> {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        if is_null || datum.is_null() {
            return None;
        }
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        // SAFETY: the datum is a non-NULL varlena (the caller's contract), so its first byte is a
        // header. A 4-byte header that is not compressed, or a 1-byte header that does not point
        // out of line, is a complete value in place, which is what pg_detoast_datum_packed would
        // return unchanged; anything else goes through it. The bytes live as long as the call's
        // arguments.
        unsafe {
            let in_place =
                pgrx::varatt_is_4b_u(ptr) || (pgrx::varatt_is_1b(ptr) && !pgrx::varatt_is_1b_e(ptr));
            let ptr = if in_place { ptr } else { pg_sys::pg_detoast_datum_packed(ptr) };
            Some(Bytes(pgrx::varlena_to_byte_slice(ptr)))
        }
    }

    /// Outside an argument (a value read through SPI, say), the bytes must outlive the datum:
    /// always a detoasted copy in `memory_context`, as pgrx's `&[u8]` makes.
    unsafe fn from_datum_in_memory_context(
        mut memory_context: pgrx::PgMemoryContexts,
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null || datum.is_null() {
            return None;
        }
        // SAFETY: the datum is a non-NULL varlena; pg_detoast_datum_copy returns a complete,
        // uncompressed copy of it allocated in memory_context, which the caller chose to outlive
        // its use.
        unsafe {
            memory_context.switch_to(|_| {
                let copy = pg_sys::pg_detoast_datum_copy(datum.cast_mut_ptr());
                Some(Bytes(pgrx::varlena_to_byte_slice(copy)))
            })
        }
    }
}

// SAFETY: unboxes through FromDatum above, NULL as None, as pgrx does for `&[u8]`.
unsafe impl<'fcx> ArgAbi<'fcx> for Bytes<'fcx> {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the argument is a bytea or text, as the function's SQL declares.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

impl_sql_translatable!(Bytes<'_>, "bytea");
impl_sql_translatable!(Bytea, "bytea");
impl_sql_translatable!(Text, "text");

// SAFETY: the datum is a complete varlena in the function's memory context, which is what
// PostgreSQL expects back for bytea and text.
unsafe impl BoxRet for Bytea {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        // SAFETY: see the impl.
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

// SAFETY: as for Bytea; the bytes were checked to be UTF-8 without NUL.
unsafe impl BoxRet for Text {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        // SAFETY: see the impl.
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

pub fn bytea(len: usize, fill: impl FnOnce(&mut [u8])) -> Bytea {
    Bytea(build(len, fill))
}

/// `fill` must leave valid UTF-8 without NUL bytes (or raise an ERROR).
pub fn text(len: usize, fill: impl FnOnce(&mut [u8])) -> Text {
    Text(build(len, fill))
}

/// A varlena of any type with `len` data bytes that `fill` writes.
pub fn datum(len: usize, fill: impl FnOnce(&mut [u8])) -> pg_sys::Datum {
    build(len, fill)
}

/// The largest allocation PostgreSQL allows (`MaxAllocSize`).
const MAX_ALLOC: usize = 0x3fff_ffff;

/// Allocates a varlena with `len` data bytes in the current memory context, lets `fill` write
/// every one of them, and returns it as a datum.
fn build(len: usize, fill: impl FnOnce(&mut [u8])) -> pg_sys::Datum {
    let total = len.saturating_add(pg_sys::VARHDRSZ);
    if total > MAX_ALLOC {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            "value too large for immuta",
            Some(format!("The result would be {len} bytes; PostgreSQL values are limited to 1 GB.")),
            None,
        );
    }
    // SAFETY: palloc0 returns `total` zeroed (so initialised) writable bytes in
    // CurrentMemoryContext, or raises ERROR; we write the 4-byte header and hand `fill` exactly
    // the `len` data bytes after it. The memory outlives this call: it belongs to the context the
    // function was called in, which is where PostgreSQL expects the result.
    unsafe {
        let ptr = pg_sys::palloc0(total).cast::<u8>();
        pgrx::set_varsize_4b(ptr.cast(), total as i32);
        fill(std::slice::from_raw_parts_mut(ptr.add(pg_sys::VARHDRSZ), len));
        pg_sys::Datum::from(ptr)
    }
}
