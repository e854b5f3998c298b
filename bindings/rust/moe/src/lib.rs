//! Safe Rust API for libmoe, a Mixture-of-Experts layer library.
//!
//! Handles own their C objects and destroy them on drop: [`Router`]
//! (logits or hidden states -> top-k ids and weights), [`Dispatcher`] (global
//! ids -> local ids and routing metadata), [`Runner`] (the fused expert
//! computation) and [`SharedExperts`] (dense experts every token goes
//! through), plus [`Layer`], the one-call route -> dispatch -> run, and
//! [`Block`], the whole MoE block (gate projection, routed and shared
//! experts) in one call. With the `nccl` feature (a libmoe built with NCCL),
//! [`A2aDispatcher`] exchanges tokens between expert-parallel ranks. Tensors cross as borrowed
//! DLPack views ([`Tensor`], [`TensorMut`]); every call returns
//! `Result<T, Error>` with the library's status and message.
//!
//! The first constructor called checks that the loaded libmoe has the major
//! version this crate was built against ([`check_version`]).
//!
//! ```
//! use moe::{DispatcherConfig, Layer, RouterConfig, RoutingMethod, RunnerConfig};
//! # fn main() -> Result<(), moe::Error> {
//! let (e, k, h, i) = (8, 2, 64, 128);
//! let w13 = vec![0.01f32; e * 2 * i * h];
//! let w2 = vec![0.01f32; e * h * i];
//! let router = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, e as i32, k)?.renormalize(true).build()?;
//! let dispatcher = DispatcherConfig::new(e as i32)?.build()?;
//! let mut runner = RunnerConfig::new(e as i32, h as i32, i as i32)?.build()?;
//! runner.set_weights(
//!     &moe::Tensor::f32(&w13, &[e as i64, 2 * i as i64, h as i64])?,
//!     &moe::Tensor::f32(&w2, &[e as i64, h as i64, i as i64])?,
//! )?;
//! let layer = Layer::new(router, dispatcher, runner);
//! let (hidden, logits) = (vec![0.5f32; 4 * h], vec![0.0f32; 4 * e]);
//! let y = layer.forward_f32(&hidden, &logits)?;
//! assert!(y.len() == 4 * h && y.iter().all(|v| v.is_finite()));
//! # Ok(()) }
//! ```

#[cfg(feature = "nccl")]
mod a2a;
mod block;
mod dispatcher;
mod error;
mod layer;
mod router;
mod runner;
mod shared;
mod tensor;
mod version;

#[cfg(feature = "nccl")]
pub use a2a::{A2aBufferSizes, A2aConfig, A2aDispatcher};
pub use block::Block;
pub use dispatcher::{Dispatcher, DispatcherConfig};
pub use error::{Error, Result, Status};
pub use layer::Layer;
pub use router::{pack_topk, Router, RouterConfig, RoutingMethod};
pub use runner::{ActScaleMode, Activation, QuantMode, Runner, RunnerConfig};
pub use shared::{SharedExperts, SharedExpertsConfig};
pub use tensor::{
    DType, Device, HalfType, HostWorkspace, Stream, Tensor, TensorMut, Workspace, MAX_NDIM, WORKSPACE_ALIGN,
};
pub use version::{check_version, has_cuda, version, version_string, Version, BUILT_AGAINST};

/// The raw bindings, for what the safe API does not cover.
pub use moe_sys as sys;
