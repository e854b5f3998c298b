//! The NCCL all-to-all dispatcher for expert parallelism across ranks
//! (moe/moe_nccl.h). Only with the `nccl` feature: the `moe_a2a_*` symbols
//! exist only in a libmoe built with NCCL.
//!
//! One step on every rank: `dispatch` (hidden + global top-k -> receive
//! buffers), a standard [`Dispatcher`](crate::Dispatcher) over the local ids
//! and a [`Runner`](crate::Runner) on the received rows, then `combine`.
//! Every tensor is a CUDA view built with the `unsafe` raw constructors.

use std::ffi::c_void;
use std::fmt;
use std::ptr::{self, NonNull};

use moe_sys as sys;

use crate::error::{check, defaulted_config, Error, Result};
use crate::tensor::{DType, Stream, Tensor, TensorMut};
use crate::version::check_version;

/// Builder over `moe_a2a_config_t`, starting from `moe_a2a_config_default()`.
pub struct A2aConfig {
    raw: sys::moe_a2a_config_t,
    expert_rank: Option<Vec<i32>>,
    expert_local_id: Option<Vec<i32>>,
}

impl fmt::Debug for A2aConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("A2aConfig")
            .field("num_experts", &self.raw.num_experts)
            .field("ep_size", &self.raw.ep_size)
            .field("ep_rank", &self.raw.ep_rank)
            .field("hidden_size", &self.raw.hidden_size)
            .field("max_tokens_per_rank", &self.raw.max_tokens_per_rank)
            .field("top_k", &self.raw.top_k)
            .field("expert_rank", &self.expert_rank)
            .field("expert_local_id", &self.expert_local_id)
            .finish()
    }
}

impl A2aConfig {
    /// E global experts, hidden size H, at most M tokens per rank and call, k slots per token;
    /// defaults: one rank, contiguous mapping, bf16 hidden states.
    pub fn new(num_experts: i32, hidden_size: i32, max_tokens_per_rank: i32, top_k: i32) -> Result<Self> {
        check_version()?;
        // SAFETY: moe_a2a_config_t is a libmoe config and the closure calls its *_default().
        let mut raw: sys::moe_a2a_config_t = unsafe { defaulted_config(|p| sys::moe_a2a_config_default(p))? };
        raw.num_experts = num_experts;
        raw.hidden_size = hidden_size;
        raw.max_tokens_per_rank = max_tokens_per_rank;
        raw.top_k = top_k;
        Ok(A2aConfig {
            raw,
            expert_rank: None,
            expert_local_id: None,
        })
    }

    /// This rank and the number of ranks (both must match the communicator).
    pub fn ranks(mut self, ep_rank: i32, ep_size: i32) -> Self {
        self.raw.ep_rank = ep_rank;
        self.raw.ep_size = ep_size;
        self
    }
    /// f32, f16 or bf16.
    pub fn hidden_dtype(mut self, dtype: DType) -> Self {
        self.raw.hidden_dtype = dtype.dl();
        self
    }
    /// Explicit placement, [E] each: the rank holding expert e and its local id there
    /// (None: contiguous blocks / position among the rank's experts).
    pub fn mapping(mut self, expert_rank: Option<Vec<i32>>, expert_local_id: Option<Vec<i32>>) -> Self {
        self.expert_rank = expert_rank;
        self.expert_local_id = expert_local_id;
        self
    }

    /// The raw config, with the mapping pointers into `self` (valid while `self` lives).
    fn raw(&self) -> sys::moe_a2a_config_t {
        let mut raw = sys::moe_a2a_config_t { ..self.raw };
        raw.expert_rank = self.expert_rank.as_ref().map_or(ptr::null(), |v| v.as_ptr());
        raw.expert_local_id = self.expert_local_id.as_ref().map_or(ptr::null(), |v| v.as_ptr());
        raw
    }
}

/// What `moe_a2a_buffer_sizes` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct A2aBufferSizes {
    /// R = ep_size * max_tokens_per_rank: rows of the receive buffers.
    pub recv_rows: i64,
    /// E_loc of this rank (the runner's num_experts).
    pub num_local_experts: i32,
    /// Device memory the handle holds.
    pub device_bytes: usize,
}

/// An owned `moe_a2a_t`, destroyed on drop (which waits for its device work).
/// The NCCL communicator stays the caller's.
#[derive(Debug)]
pub struct A2aDispatcher {
    handle: NonNull<sys::moe_a2a_s>,
    num_experts: i32,
    sizes: A2aBufferSizes,
}

// SAFETY: moe_nccl.h: a handle holds the state of one step and is used from one
// thread per rank in stream order: dispatch and combine take `&mut self`, so no
// two of them overlap. The `&self` calls (buffer sizes, mapping) only read what
// create fixed. Moving the handle to another thread is allowed (any thread may
// drive the rank). The last error is thread-local.
unsafe impl Send for A2aDispatcher {}
unsafe impl Sync for A2aDispatcher {}

impl A2aDispatcher {
    /// Collective: every rank of the communicator calls it with an equal config
    /// (else every rank gets INVALID_ARGUMENT naming the first field that differs).
    ///
    /// # Safety
    /// `comm` is NULL (rejected with an error) or a live, blocking `ncclComm_t`
    /// of this rank whose device is the one the handle will use; the caller owns
    /// it and keeps it alive until this handle is dropped.
    pub unsafe fn new(config: &A2aConfig, comm: *mut c_void) -> Result<A2aDispatcher> {
        check_version()?;
        let raw = config.raw();
        let mut handle: sys::moe_a2a_t = ptr::null_mut();
        check(sys::moe_a2a_create(&raw, comm, &mut handle))?;
        let handle = NonNull::new(handle)
            .ok_or_else(|| Error::new(crate::Status::INTERNAL_ERROR, "moe_a2a_create returned NULL"))?;
        let mut a2a = A2aDispatcher {
            handle,
            num_experts: raw.num_experts,
            sizes: A2aBufferSizes {
                recv_rows: 0,
                num_local_experts: 0,
                device_bytes: 0,
            },
        };
        let s = &mut a2a.sizes;
        // SAFETY: a live handle and valid out pointers (dropped on error).
        check(sys::moe_a2a_buffer_sizes(
            a2a.handle.as_ptr(),
            &mut s.recv_rows,
            &mut s.num_local_experts,
            &mut s.device_bytes,
        ))?;
        Ok(a2a)
    }

    pub fn buffer_sizes(&self) -> A2aBufferSizes {
        self.sizes
    }

    /// Host copies of the mapping: (expert_rank [E], expert_local_id [E]).
    pub fn mapping(&self) -> Result<(Vec<i32>, Vec<i32>)> {
        let e = self.num_experts.max(0) as usize;
        let (mut rank, mut local) = (vec![0i32; e], vec![0i32; e]);
        // SAFETY: both buffers hold E values.
        check(unsafe {
            sys::moe_a2a_get_mapping(self.as_raw(), rank.as_mut_ptr(), local.as_mut_ptr(), e as i64)
        })?;
        Ok((rank, local))
    }

    /// Collective. hidden [T, H], topk_ids [T, k] i32 global, topk_weights [T, k] f32 ->
    /// recv_hidden [R, H], recv_local_ids [R, k] i32, recv_weights [R, k] f32, recv_counts [ep_size] i32.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &mut self,
        hidden: &Tensor<'_>,
        topk_ids: &Tensor<'_>,
        topk_weights: &Tensor<'_>,
        recv_hidden: &mut TensorMut<'_>,
        recv_local_ids: &mut TensorMut<'_>,
        recv_weights: &mut TensorMut<'_>,
        recv_counts: &mut TensorMut<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, ids, w) = (hidden.dl(), topk_ids.dl(), topk_weights.dl());
        let (mut rx, mut rids, mut rw, mut rc) = (
            recv_hidden.dl(),
            recv_local_ids.dl(),
            recv_weights.dl(),
            recv_counts.dl(),
        );
        // SAFETY: views of live memory (the raw constructors' contract); the
        // library validates shapes, dtypes and devices before enqueueing.
        check(unsafe {
            sys::moe_a2a_dispatch(
                self.as_raw(),
                &x,
                &ids,
                &w,
                &mut rx,
                &mut rids,
                &mut rw,
                &mut rc,
                stream.as_raw(),
            )
        })
    }

    /// Collective. expert_output [R, H] -> output [T, H] (T of the last dispatch).
    pub fn combine(
        &mut self,
        expert_output: &Tensor<'_>,
        output: &mut TensorMut<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, mut y) = (expert_output.dl(), output.dl());
        // SAFETY: as in dispatch.
        check(unsafe { sys::moe_a2a_combine(self.as_raw(), &x, &mut y, stream.as_raw()) })
    }

    pub fn as_raw(&self) -> sys::moe_a2a_t {
        self.handle.as_ptr()
    }
}

impl Drop for A2aDispatcher {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nobody uses it after this.
        unsafe { sys::moe_a2a_destroy(self.handle.as_ptr()) };
    }
}
