//! The raw bindings against the libmoe built from this repository: the
//! version, the status strings and the config struct sizes agree.

use moe_sys::*;
use std::ffi::CStr;

#[test]
fn version_matches_the_generated_header() {
    // SAFETY: no preconditions; the string is static.
    let (n, s) = unsafe { (moe_version(), CStr::from_ptr(moe_version_string())) };
    assert_eq!(n, MOE_VERSION_NUMBER);
    assert_eq!(s.to_bytes_with_nul(), MOE_VERSION_STRING);
}

#[test]
fn every_status_has_text() {
    for st in 0..moe_status_t_MOE_STATUS_NUM_STATUSES + 2 {
        // SAFETY: any value is accepted; the text is static.
        let text = unsafe { CStr::from_ptr(moe_status_string(st)) }.to_str().unwrap();
        assert!(!text.is_empty());
        if st >= moe_status_t_MOE_STATUS_NUM_STATUSES {
            assert_eq!(text, "unknown status");
        }
    }
}

/// A zeroed config with struct_size set, as *_default() requires.
fn sized<T>() -> T {
    // SAFETY: plain-data structs (integers, floats, NULL pointers), valid when zeroed.
    let mut c: T = unsafe { std::mem::zeroed() };
    // SAFETY: every config starts with `uint32_t struct_size`.
    unsafe { *(&mut c as *mut T as *mut u32) = std::mem::size_of::<T>() as u32 };
    c
}

#[test]
fn config_structs_have_the_library_size() {
    // SAFETY: each struct is complete and its struct_size says so; the library fills it.
    unsafe {
        let mut r: moe_router_config_t = sized();
        assert_eq!(
            moe_router_config_default(&mut r, moe_routing_method_t_MOE_ROUTING_SOFTMAX_TOPK as i32),
            0
        );
        assert_eq!(r.struct_size as usize, std::mem::size_of::<moe_router_config_t>());
        let mut d: moe_dispatcher_config_t = sized();
        assert_eq!(moe_dispatcher_config_default(&mut d), 0);
        assert_eq!(
            d.struct_size as usize,
            std::mem::size_of::<moe_dispatcher_config_t>()
        );
        let mut n: moe_runner_config_t = sized();
        assert_eq!(moe_runner_config_default(&mut n), 0);
        assert_eq!(n.struct_size as usize, std::mem::size_of::<moe_runner_config_t>());
        let mut s: moe_shared_experts_config_t = sized();
        assert_eq!(moe_shared_experts_config_default(&mut s), 0);
        assert_eq!(
            s.struct_size as usize,
            std::mem::size_of::<moe_shared_experts_config_t>()
        );
        assert_eq!((s.num_shared_experts, s.gated), (1, 1));
    }
}

#[cfg(feature = "nccl")]
#[test]
fn a2a_config_has_the_library_size() {
    // SAFETY: as above.
    unsafe {
        let mut a: moe_a2a_config_t = sized();
        assert_eq!(moe_a2a_config_default(&mut a), 0);
        assert_eq!(a.struct_size as usize, std::mem::size_of::<moe_a2a_config_t>());
        assert_eq!((a.ep_size, a.ep_rank), (1, 0));
        assert_eq!(moe_a2a_destroy(std::ptr::null_mut()), 0);
    }
}

#[test]
fn destroy_accepts_null() {
    // SAFETY: moe.h: destroy accepts NULL.
    unsafe {
        assert_eq!(moe_router_destroy(std::ptr::null_mut()), 0);
        assert_eq!(moe_dispatcher_destroy(std::ptr::null_mut()), 0);
        assert_eq!(moe_runner_destroy(std::ptr::null_mut()), 0);
        assert_eq!(moe_shared_experts_destroy(std::ptr::null_mut()), 0);
    }
}
