//! `coda_config`: a mutable builder of client options, set by key so new
//! options never change the ABI.

use std::ffi::{c_char, c_int};

use super::{boundary, boundary_void, c_str, handle_mut, out_ptr};
use crate::client::Config;

/// Client options; made by `coda_config_new`, freed by `coda_config_free`.
pub struct coda_config {
    pub(crate) inner: Config,
}

/// Make a configuration holding the defaults.
#[no_mangle]
pub extern "C" fn coda_config_new(out: *mut *mut coda_config) -> c_int {
    boundary(|| {
        let out = out_ptr(out, "out")?;
        let cfg = Box::new(coda_config {
            inner: Config::new(),
        });
        // SAFETY: checked non-NULL above.
        unsafe { *out = Box::into_raw(cfg) };
        Ok(0)
    })
}

/// Set option `key` to `value` (see the README for keys). Unknown keys and
/// malformed values are `-EINVAL`, with a message naming them.
#[no_mangle]
pub extern "C" fn coda_config_set(
    cfg: *mut coda_config,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    boundary(|| {
        let cfg = handle_mut(cfg, "cfg")?;
        let key = c_str(key, "key")?;
        let value = c_str(value, "value")?;
        cfg.inner.set(key, value)?;
        Ok(0)
    })
}

/// Free a configuration. NULL is allowed.
#[no_mangle]
pub extern "C" fn coda_config_free(cfg: *mut coda_config) {
    boundary_void(|| {
        if !cfg.is_null() {
            // SAFETY: made by coda_config_new and not freed before (caller's contract).
            drop(unsafe { Box::from_raw(cfg) });
        }
    })
}
