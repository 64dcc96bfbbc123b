//! `coda_strerror` and `coda_last_error`: static text for a code, and the
//! calling thread's detail message of its last failure.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr};

use super::boundary;
use crate::Error;

/// The object changed on the server since the client cached it.
pub const CODA_ECONFLICT: c_int = 0 - 10001;
/// The peer broke the wire protocol.
pub const CODA_EPROTO: c_int = 0 - 10002;
/// A bug inside the library was caught at the C boundary.
pub const CODA_EPANIC: c_int = 0 - 10003;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(e: &Error) {
    LAST_ERROR.with(|l| *l.borrow_mut() = e.to_string());
}

/// Static, NUL-terminated text for any code this library returns (0, a
/// negative errno, or a `CODA_E*` code). Never NULL; never to be freed.
#[no_mangle]
pub extern "C" fn coda_strerror(code: c_int) -> *const c_char {
    // Keep one static C string per distinct text.
    static TEXTS: parking_lot::Mutex<Vec<(&'static str, &'static CStr)>> =
        parking_lot::Mutex::new(Vec::new());
    let text = Error::describe(code);
    let mut texts = TEXTS.lock();
    if let Some((_, c)) = texts.iter().find(|(t, _)| *t == text) {
        return c.as_ptr();
    }
    let owned: &'static CStr = Box::leak(
        std::ffi::CString::new(text)
            .unwrap_or_default()
            .into_boxed_c_str(),
    );
    texts.push((text, owned));
    owned.as_ptr()
}

/// Copy the calling thread's detail message of its last failure into `buf`
/// (at most `len - 1` bytes and a NUL), and return the message's full length
/// in bytes, so a caller can retry with a larger buffer. `buf` may be NULL
/// when `len` is 0.
#[no_mangle]
pub extern "C" fn coda_last_error(buf: *mut c_char, len: usize) -> c_int {
    boundary(|| {
        LAST_ERROR.with(|l| {
            let msg = l.borrow();
            if !buf.is_null() && len > 0 {
                let n = msg.len().min(len - 1);
                // SAFETY: the caller gave `len` writable bytes at `buf`.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
                    *buf.add(n) = 0;
                }
            }
            Ok(msg.len().min(c_int::MAX as usize) as c_int)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_codes_are_the_crate_codes() {
        // cbindgen needs literals; src/error.rs decides the values.
        assert_eq!(CODA_ECONFLICT, crate::error::CODA_ECONFLICT);
        assert_eq!(CODA_EPROTO, crate::error::CODA_EPROTO);
        assert_eq!(CODA_EPANIC, crate::error::CODA_EPANIC);
    }
}
