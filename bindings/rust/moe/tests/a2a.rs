//! The all-to-all dispatcher's binding (feature `nccl`, a libmoe built with
//! NCCL). Without GPUs only what fails before NCCL is touched can run here:
//! the multi-rank exchange is tested by the C++ NCCL suite (tests/nccl).
#![cfg(feature = "nccl")]

use moe::{A2aConfig, A2aDispatcher, DType, Status};

#[test]
fn create_with_a_null_communicator_fails_with_the_library_message() {
    let config = A2aConfig::new(16, 64, 8, 2)
        .unwrap()
        .ranks(0, 1)
        .hidden_dtype(DType::F32);
    // SAFETY: a NULL communicator is rejected before anything is used.
    let err = unsafe { A2aDispatcher::new(&config, std::ptr::null_mut()) }.unwrap_err();
    assert_eq!(err.status, Status::INVALID_ARGUMENT, "{err}");
    assert!(err.message.contains("moe_a2a_create"), "{}", err.message);
    assert!(err.message.contains("nccl_comm"), "{}", err.message);
}

#[test]
fn config_mapping_is_passed_by_pointer() {
    // The mapping vectors stay owned by the config; creation still fails on the NULL
    // communicator, which is checked first, so this only exercises the builder.
    let config = A2aConfig::new(4, 8, 2, 1)
        .unwrap()
        .ranks(0, 2)
        .mapping(Some(vec![0, 1, 0, 1]), Some(vec![0, 0, 1, 1]));
    assert!(format!("{config:?}").contains("expert_rank: Some([0, 1, 0, 1])"));
    // SAFETY: as above.
    assert!(unsafe { A2aDispatcher::new(&config, std::ptr::null_mut()) }.is_err());
}
