//! Shared experts: `n_shared` dense MLPs every token goes through (moe/moe_block.h).

use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use moe_sys as sys;

use crate::error::{check, defaulted_config, Error, Result};
use crate::runner::Activation;
use crate::tensor::{opt_dl, opt_ptr, Device, Stream, Tensor, TensorMut, Workspace};
use crate::version::check_version;

/// Builder over `moe_shared_experts_config_t`, starting from `moe_shared_experts_config_default()`.
#[derive(Clone, Copy, Debug)]
pub struct SharedExpertsConfig {
    raw: sys::moe_shared_experts_config_t,
}

impl SharedExpertsConfig {
    /// Defaults (gated SiLU) for `num_shared` experts of H -> I_shared -> H.
    pub fn new(num_shared: i32, hidden_size: i32, intermediate_size: i32) -> Result<Self> {
        check_version()?;
        // SAFETY: moe_shared_experts_config_t is a libmoe config and the closure calls its *_default().
        let mut raw: sys::moe_shared_experts_config_t =
            unsafe { defaulted_config(|p| sys::moe_shared_experts_config_default(p))? };
        raw.num_shared_experts = num_shared;
        raw.hidden_size = hidden_size;
        raw.intermediate_size = intermediate_size;
        Ok(SharedExpertsConfig { raw })
    }

    pub fn activation(mut self, a: Activation) -> Self {
        self.raw.activation = a.0;
        self
    }
    /// Gated: w13 is [n, 2I, H] and h = act(gate) * up; else [n, I, H].
    pub fn gated(mut self, on: bool) -> Self {
        self.raw.gated = on as i32;
        self
    }
    /// w13 rows are [up; gate].
    pub fn swap_gate_up(mut self, on: bool) -> Self {
        self.raw.swap_gate_up = on as i32;
        self
    }
    pub fn as_raw(&self) -> &sys::moe_shared_experts_config_t {
        &self.raw
    }
    pub fn as_raw_mut(&mut self) -> &mut sys::moe_shared_experts_config_t {
        &mut self.raw
    }
    pub fn build<'w>(&self) -> Result<SharedExperts<'w>> {
        SharedExperts::new(self)
    }
}

/// An owned `moe_shared_experts_t`, destroyed on drop; it borrows its weights for `'w`.
#[derive(Debug)]
pub struct SharedExperts<'w> {
    handle: NonNull<sys::moe_shared_experts_s>,
    config: sys::moe_shared_experts_config_t,
    _weights: PhantomData<&'w [u8]>,
}

// SAFETY: as for Runner: set_weights, which must not run concurrently with any
// other call on the handle, takes `&mut self`; runs take `&self` and either a
// caller workspace (an exclusive borrow) or the library's own, whose users the
// library serializes (on CUDA the fork/join of the side stream is under a
// mutex, moe_block.h). The last error is thread-local.
unsafe impl Send for SharedExperts<'_> {}
unsafe impl Sync for SharedExperts<'_> {}

impl<'w> SharedExperts<'w> {
    pub fn new(config: &SharedExpertsConfig) -> Result<SharedExperts<'w>> {
        check_version()?;
        let mut handle: sys::moe_shared_experts_t = ptr::null_mut();
        // SAFETY: the config is a complete struct whose struct_size is its own size.
        check(unsafe { sys::moe_shared_experts_create(&config.raw, &mut handle) })?;
        let handle = NonNull::new(handle).ok_or_else(|| {
            Error::new(
                crate::Status::INTERNAL_ERROR,
                "moe_shared_experts_create returned NULL",
            )
        })?;
        Ok(SharedExperts {
            handle,
            config: config.raw,
            _weights: PhantomData,
        })
    }

    /// The config the handle was created with.
    pub fn config(&self) -> &sys::moe_shared_experts_config_t {
        &self.config
    }

    /// Borrow w13 [n, 2I or I, H], w2 [n, H, I] and the optional sigmoid gate [1, H]
    /// (Qwen2-MoE's shared_expert_gate).
    pub fn set_weights(
        &mut self,
        w13: &Tensor<'w>,
        w2: &Tensor<'w>,
        gate_weight: Option<&Tensor<'w>>,
    ) -> Result<()> {
        let (w13, w2, gate) = (w13.dl(), w2.dl(), opt_dl(gate_weight));
        // SAFETY: the data outlives the handle ('w) and is read-only while borrowed.
        check(unsafe { sys::moe_shared_experts_set_weights(self.as_raw(), &w13, &w2, opt_ptr(&gate)) })
    }

    /// Workspace bytes of `run` for up to `max_tokens` tokens on `device`.
    pub fn workspace_size(&self, max_tokens: i64, device: Device) -> Result<usize> {
        let mut bytes = 0usize;
        // SAFETY: a live handle and a valid out pointer.
        check(unsafe {
            sys::moe_shared_experts_workspace_size(self.as_raw(), max_tokens, device.dl_type(), &mut bytes)
        })?;
        Ok(bytes)
    }

    /// output [T, H] = shared(hidden [T, H]), or output += shared(hidden) with `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        hidden: &Tensor<'_>,
        num_valid_tokens: Option<&Tensor<'_>>,
        output: &mut TensorMut<'_>,
        accumulate: bool,
        workspace: Workspace<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, valid, mut y) = (hidden.dl(), opt_dl(num_valid_tokens), output.dl());
        let (ws, ws_bytes) = workspace.raw();
        // SAFETY: live borrows of the described extent; the library validates first.
        check(unsafe {
            sys::moe_shared_experts_run(
                self.as_raw(),
                &x,
                opt_ptr(&valid),
                &mut y,
                accumulate as i32,
                ws,
                ws_bytes,
                stream.as_raw(),
            )
        })
    }

    pub fn as_raw(&self) -> sys::moe_shared_experts_t {
        self.handle.as_ptr()
    }
}

impl Drop for SharedExperts<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nobody uses it after this.
        unsafe { sys::moe_shared_experts_destroy(self.handle.as_ptr()) };
    }
}
