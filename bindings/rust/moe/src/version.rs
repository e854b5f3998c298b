//! The run-time version check: the loaded libmoe must have the major version
//! this crate was built against (its SOVERSION); checked once, on first use.

use std::sync::OnceLock;

use moe_sys as sys;

use crate::error::{c_text, Error, Result, Status};

/// A libmoe version, decoded from MOE_VERSION_NUMBER (major*10000 + minor*100 + patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub fn from_number(n: u32) -> Version {
        Version {
            major: n / 10000,
            minor: n / 100 % 100,
            patch: n % 100,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version of the header this crate was generated from.
pub const BUILT_AGAINST: Version = Version {
    major: sys::MOE_VERSION_MAJOR,
    minor: sys::MOE_VERSION_MINOR,
    patch: sys::MOE_VERSION_PATCH,
};

/// The version of the libmoe actually loaded (`moe_version()`).
pub fn version() -> Version {
    // SAFETY: no arguments, no preconditions.
    Version::from_number(unsafe { sys::moe_version() })
}

/// `moe_version_string()` of the loaded library.
pub fn version_string() -> String {
    // SAFETY: returns static text.
    unsafe { c_text(sys::moe_version_string()) }
}

/// Whether the loaded libmoe has the CUDA backend.
pub fn has_cuda() -> bool {
    // SAFETY: no arguments, no preconditions.
    unsafe { sys::moe_has_cuda() != 0 }
}

/// Ok when the loaded library's major version equals the one this crate was
/// built against. Every constructor calls it; the answer is computed once.
pub fn check_version() -> Result<()> {
    static CHECKED: OnceLock<Result<()>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let loaded = version();
            if loaded.major == BUILT_AGAINST.major {
                Ok(())
            } else {
                Err(Error::new(
                    Status::NOT_AVAILABLE,
                    format!(
                        "libmoe version mismatch: the loaded library is {loaded} (major {}), \
                         this crate was built against {BUILT_AGAINST} (major {})",
                        loaded.major, BUILT_AGAINST.major
                    ),
                ))
            }
        })
        .clone()
}
