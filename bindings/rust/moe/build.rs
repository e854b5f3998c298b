//! Adds an rpath to libmoe's directory (found by moe-sys, passed on as
//! DEP_MOE_LIB_DIR) so this crate's tests and examples run without
//! LD_LIBRARY_PATH: cargo does not pass a dependency's link args on.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MOE_LIB_DIR");
    if let Ok(dir) = std::env::var("DEP_MOE_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
