// Give libcoda.so a SONAME carrying the major version, so programs linked
// against 0.x keep finding a compatible library after upgrades.
fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcoda.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
