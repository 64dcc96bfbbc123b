//! The library's version, at compile time (macros) and at run time.

use std::ffi::c_char;

/// Kept equal to Cargo.toml's version; a test checks it.
pub const CODA_VERSION_MAJOR: u32 = 0;
/// The minor version (compatible additions).
pub const CODA_VERSION_MINOR: u32 = 1;
/// The patch version (fixes).
pub const CODA_VERSION_PATCH: u32 = 0;

/// The version as "MAJOR.MINOR.PATCH", static and NUL-terminated.
#[no_mangle]
pub extern "C" fn coda_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constants_match_cargo_version() {
        let v = format!("{CODA_VERSION_MAJOR}.{CODA_VERSION_MINOR}.{CODA_VERSION_PATCH}");
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        let s = unsafe { std::ffi::CStr::from_ptr(coda_version()) };
        assert_eq!(s.to_str().unwrap(), v);
    }
}
