//! The C ABI: a thin, mechanical layer over the Rust API.
//!
//! Conventions (see docs and C-API.md): every fallible export returns `0` or
//! a count on success and a negative errno (or `CODA_E*` ≤ -10000) on
//! failure; outputs are written only on success; NULL or non-UTF-8 input is
//! `-EINVAL`; every export runs inside `boundary`, so a panic becomes
//! `CODA_EPANIC` and never unwinds into C.
#![allow(non_camel_case_types)]
// These exports exist to be called from C, where `unsafe` means nothing;
// pointer validity is the C caller's documented contract, NULL is checked.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod acl;
pub mod client;
pub mod config;
pub mod conflict;
pub mod error;
pub mod event;
pub mod failover;
pub mod file;
pub mod version;

use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::CODA_EPANIC;
use crate::{Error, Result};

/// Run an export's body: errors become negative codes and are remembered for
/// `coda_last_error`; panics become `CODA_EPANIC`.
pub(crate) fn boundary<F>(f: F) -> c_int
where
    F: FnOnce() -> Result<c_int>,
{
    boundary_i64(|| f().map(|v| v as i64)) as c_int
}

/// As [`boundary`], for exports that return a 64-bit count.
pub(crate) fn boundary_i64<F>(f: F) -> i64
where
    F: FnOnce() -> Result<i64>,
{
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let code = e.code();
            error::set_last_error(&e);
            code as i64
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            error::set_last_error(&Error::Panic(what));
            CODA_EPANIC as i64
        }
    }
}

/// For exports that return nothing (the `_free` family): swallow panics.
pub(crate) fn boundary_void<F: FnOnce()>(f: F) {
    let _ = catch_unwind(AssertUnwindSafe(f));
}

/// Borrow a C string argument as UTF-8; NULL or invalid UTF-8 is `Invalid`.
pub(crate) fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::Invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller promises a NUL-terminated string that outlives the call.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::Invalid(format!("{what} is not valid UTF-8")))
}

/// Borrow a handle argument; NULL is `Invalid`.
pub(crate) fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: a non-NULL handle was made by this library and is still alive
    // (the caller's contract); we never keep the borrow past the call.
    unsafe { p.as_ref() }.ok_or_else(|| Error::Invalid(format!("{what} is NULL")))
}

/// Mutably borrow a handle argument; NULL is `Invalid`.
pub(crate) fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: as for `handle`; the caller owns the object on this thread.
    unsafe { p.as_mut() }.ok_or_else(|| Error::Invalid(format!("{what} is NULL")))
}

/// Check an out-parameter before doing work, so failures write nothing.
pub(crate) fn out_ptr<T>(p: *mut T, what: &str) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::Invalid(format!("{what} is NULL")))
    } else {
        Ok(p)
    }
}
