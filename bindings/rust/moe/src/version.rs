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
        .get_or_init(|| compatible(version(), BUILT_AGAINST))
        .clone()
}

/// The rule: same major version (the library's SOVERSION).
fn compatible(loaded: Version, built: Version) -> Result<()> {
    if loaded.major == built.major {
        return Ok(());
    }
    Err(Error::new(
        Status::NOT_AVAILABLE,
        format!(
            "libmoe version mismatch: the loaded library is {loaded} (major {}), \
             this crate was built against {built} (major {})",
            loaded.major, built.major
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_version_numbers() {
        assert_eq!(
            Version::from_number(10203),
            Version {
                major: 1,
                minor: 2,
                patch: 3
            }
        );
        assert_eq!(Version::from_number(100).to_string(), "0.1.0");
    }

    #[test]
    fn major_must_match() {
        let v = |n| Version::from_number(n);
        assert!(compatible(v(10203), v(10000)).is_ok());
        assert!(compatible(v(10000), v(10999)).is_ok());
        let err = compatible(v(20000), v(10203)).unwrap_err();
        assert_eq!(err.status, Status::NOT_AVAILABLE);
        assert!(
            err.message.contains("2.0.0") && err.message.contains("1.2.3"),
            "{}",
            err.message
        );
        assert!(compatible(v(100), v(10100)).is_err());
    }

    #[test]
    fn the_loaded_library_is_compatible() {
        check_version().unwrap();
        assert_eq!(version().major, sys::MOE_VERSION_MAJOR);
    }
}
