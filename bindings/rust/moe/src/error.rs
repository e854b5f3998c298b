//! Errors: the library's status plus its thread-local message.

use std::ffi::{c_char, CStr};
use std::fmt;

use moe_sys as sys;

/// A `moe_status_t` value. A newtype rather than a Rust enum: a newer libmoe
/// may return a status this crate does not know, which must not be UB.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u32);

impl Status {
    pub const SUCCESS: Status = Status(sys::moe_status_t_MOE_STATUS_SUCCESS);
    pub const INVALID_ARGUMENT: Status = Status(sys::moe_status_t_MOE_STATUS_INVALID_ARGUMENT);
    pub const UNSUPPORTED: Status = Status(sys::moe_status_t_MOE_STATUS_UNSUPPORTED);
    pub const OUT_OF_MEMORY: Status = Status(sys::moe_status_t_MOE_STATUS_OUT_OF_MEMORY);
    pub const CUDA_ERROR: Status = Status(sys::moe_status_t_MOE_STATUS_CUDA_ERROR);
    pub const NCCL_ERROR: Status = Status(sys::moe_status_t_MOE_STATUS_NCCL_ERROR);
    pub const INTERNAL_ERROR: Status = Status(sys::moe_status_t_MOE_STATUS_INTERNAL_ERROR);
    pub const NOT_AVAILABLE: Status = Status(sys::moe_status_t_MOE_STATUS_NOT_AVAILABLE);

    /// The constant's name, or None for a value this crate does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Status::SUCCESS => "SUCCESS",
            Status::INVALID_ARGUMENT => "INVALID_ARGUMENT",
            Status::UNSUPPORTED => "UNSUPPORTED",
            Status::OUT_OF_MEMORY => "OUT_OF_MEMORY",
            Status::CUDA_ERROR => "CUDA_ERROR",
            Status::NCCL_ERROR => "NCCL_ERROR",
            Status::INTERNAL_ERROR => "INTERNAL_ERROR",
            Status::NOT_AVAILABLE => "NOT_AVAILABLE",
            _ => return None,
        })
    }

    /// The library's static text for this status (`moe_status_string`).
    pub fn description(self) -> String {
        // SAFETY: moe_status_string accepts any value and returns static text, never NULL.
        unsafe { c_text(sys::moe_status_string(self.0)) }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "Status::{name}"),
            None => write!(f, "Status({})", self.0),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description())
    }
}

/// A failed call: the status and the message of `moe_last_error()` (or, for
/// checks done in Rust before calling the library, a message in the same style).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }

    /// An INVALID_ARGUMENT error raised by a check in Rust.
    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::new(Status::INVALID_ARGUMENT, message)
    }

    /// The error of the call that just returned `status` on this thread.
    fn last(status: Status) -> Error {
        // SAFETY: moe_last_error never returns NULL; the text stays valid until
        // the next libmoe call on this thread, and we copy it before any.
        let message = unsafe { c_text(sys::moe_last_error()) };
        Error { status, message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "libmoe: {} ({:?}): {}", self.status, self.status, self.message)
    }
}

impl std::error::Error for Error {}

/// Ok for MOE_STATUS_SUCCESS, else the status with this thread's last error.
pub(crate) fn check(status: sys::moe_status_t) -> Result<()> {
    if status == sys::moe_status_t_MOE_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::last(Status(status)))
    }
}

/// Copies a NUL-terminated C string (NULL reads as "").
///
/// # Safety
/// `p` is NULL or points to a valid NUL-terminated string.
pub(crate) unsafe fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// A config struct filled by its `*_default()` function: zeroed, `struct_size`
/// set first (the library writes only that many bytes), then defaulted.
///
/// # Safety
/// `T` must be a libmoe config: plain data, valid when all-zero, whose first
/// field is `uint32_t struct_size`; `fill` must call that config's
/// `*_default()` on the pointer it gets.
pub(crate) unsafe fn defaulted_config<T>(fill: impl FnOnce(*mut T) -> sys::moe_status_t) -> Result<T> {
    let mut raw: T = std::mem::zeroed();
    let size = std::mem::size_of::<T>() as u32;
    *(&mut raw as *mut T as *mut u32) = size;
    check(fill(&mut raw))?;
    Ok(raw)
}
