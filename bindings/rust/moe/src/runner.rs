//! Runner: the fused MoE computation over the experts of this rank.

use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use moe_sys as sys;

use crate::error::{check, defaulted_config, Error, Result};
use crate::tensor::{opt_dl, opt_ptr, Device, Stream, Tensor, TensorMut, Workspace};
use crate::version::check_version;

/// A `moe_activation_t` (append-only in C, so a newtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Activation(pub i32);

impl Activation {
    pub const SILU: Activation = Activation(sys::moe_activation_t_MOE_ACTIVATION_SILU as i32);
    pub const GELU: Activation = Activation(sys::moe_activation_t_MOE_ACTIVATION_GELU as i32);
    pub const GELU_TANH: Activation = Activation(sys::moe_activation_t_MOE_ACTIVATION_GELU_TANH as i32);
    pub const RELU2: Activation = Activation(sys::moe_activation_t_MOE_ACTIVATION_RELU2 as i32);
    pub const IDENTITY: Activation = Activation(sys::moe_activation_t_MOE_ACTIVATION_IDENTITY as i32);
}

/// A `moe_quant_mode_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantMode(pub i32);

impl QuantMode {
    pub const NONE: QuantMode = QuantMode(sys::moe_quant_mode_t_MOE_QUANT_NONE as i32);
    pub const FP8_PER_TENSOR: QuantMode = QuantMode(sys::moe_quant_mode_t_MOE_QUANT_FP8_PER_TENSOR as i32);
    pub const FP8_BLOCK_128: QuantMode = QuantMode(sys::moe_quant_mode_t_MOE_QUANT_FP8_BLOCK_128 as i32);
}

/// A `moe_act_scale_mode_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ActScaleMode(pub i32);

impl ActScaleMode {
    pub const DYNAMIC: ActScaleMode = ActScaleMode(sys::moe_act_scale_mode_t_MOE_ACT_SCALE_DYNAMIC as i32);
    pub const STATIC: ActScaleMode = ActScaleMode(sys::moe_act_scale_mode_t_MOE_ACT_SCALE_STATIC as i32);
}

/// Builder over `moe_runner_config_t`, starting from `moe_runner_config_default()`.
#[derive(Clone, Copy, Debug)]
pub struct RunnerConfig {
    raw: sys::moe_runner_config_t,
}

impl RunnerConfig {
    /// Defaults (gated SiLU, no quantization, deterministic) for E_loc experts of H -> I -> H.
    pub fn new(num_experts: i32, hidden_size: i32, intermediate_size: i32) -> Result<Self> {
        check_version()?;
        // SAFETY: moe_runner_config_t is a libmoe config and the closure calls its *_default().
        let mut raw: sys::moe_runner_config_t =
            unsafe { defaulted_config(|p| sys::moe_runner_config_default(p))? };
        raw.num_experts = num_experts;
        raw.hidden_size = hidden_size;
        raw.intermediate_size = intermediate_size;
        Ok(RunnerConfig { raw })
    }

    pub fn activation(mut self, a: Activation) -> Self {
        self.raw.activation = a.0;
        self
    }
    /// Gated: w13 is [E, 2I, H] and h = act(gate) * up; else [E, I, H] and h = act(x W1).
    pub fn gated(mut self, on: bool) -> Self {
        self.raw.gated = on as i32;
        self
    }
    /// w13 rows are [up; gate] (FlashInfer) instead of [gate; up].
    pub fn swap_gate_up(mut self, on: bool) -> Self {
        self.raw.swap_gate_up = on as i32;
        self
    }
    /// Multiply x by the routing weight before W13 (Llama 4; top-1 only).
    pub fn apply_router_weight_on_input(mut self, on: bool) -> Self {
        self.raw.apply_router_weight_on_input = on as i32;
        self
    }
    pub fn quant_mode(mut self, q: QuantMode) -> Self {
        self.raw.quant_mode = q.0;
        self
    }
    pub fn act_scale_mode(mut self, m: ActScaleMode) -> Self {
        self.raw.act_scale_mode = m.0;
        self
    }
    pub fn output_scale(mut self, s: f32) -> Self {
        self.raw.output_scale = s;
        self
    }
    pub fn deterministic(mut self, on: bool) -> Self {
        self.raw.deterministic = on as i32;
        self
    }
    /// CUDA only: check ids on the device and report bad ones (one sync per call).
    pub fn validate_ids(mut self, on: bool) -> Self {
        self.raw.validate_ids = on as i32;
        self
    }

    pub fn as_raw(&self) -> &sys::moe_runner_config_t {
        &self.raw
    }
    pub fn as_raw_mut(&mut self) -> &mut sys::moe_runner_config_t {
        &mut self.raw
    }

    pub fn build<'w>(&self) -> Result<Runner<'w>> {
        Runner::new(self)
    }
}

/// An owned `moe_runner_t`, destroyed on drop. It borrows its expert weights
/// (the C library keeps only pointers), so it cannot outlive them: `'w`.
#[derive(Debug)]
pub struct Runner<'w> {
    handle: NonNull<sys::moe_runner_s>,
    config: sys::moe_runner_config_t,
    _weights: PhantomData<&'w [u8]>,
}

// SAFETY: moe.h: handles are immutable after creation except through
// moe_runner_set_weights, which must not run concurrently with any other call
// on the runner: it takes `&mut self`, every other method `&self`. Concurrent
// runs are allowed with separate workspaces (`Workspace` is an exclusive
// borrow) or the internal one (serialized by the library). The borrowed weights
// are read-only data. The last error is thread-local and read on the same thread.
unsafe impl Send for Runner<'_> {}
unsafe impl Sync for Runner<'_> {}

impl<'w> Runner<'w> {
    pub fn new(config: &RunnerConfig) -> Result<Runner<'w>> {
        check_version()?;
        let mut handle: sys::moe_runner_t = ptr::null_mut();
        // SAFETY: the config is a complete struct whose struct_size is its own size.
        check(unsafe { sys::moe_runner_create(&config.raw, &mut handle) })?;
        let handle = NonNull::new(handle)
            .ok_or_else(|| Error::new(crate::Status::INTERNAL_ERROR, "moe_runner_create returned NULL"))?;
        Ok(Runner {
            handle,
            config: config.raw,
            _weights: PhantomData,
        })
    }

    /// The config the runner was created with.
    pub fn config(&self) -> &sys::moe_runner_config_t {
        &self.config
    }

    /// Borrow unquantized weights: w13 [E_loc, 2I or I, H], w2 [E_loc, H, I] (f32/f16/bf16).
    pub fn set_weights(&mut self, w13: &Tensor<'w>, w2: &Tensor<'w>) -> Result<()> {
        self.set_weights_scaled(w13, w2, None, None, None, None)
    }

    /// Borrow weights with FP8 scales (see moe_runner_set_weights); unused scales are None.
    pub fn set_weights_scaled(
        &mut self,
        w13: &Tensor<'w>,
        w2: &Tensor<'w>,
        w13_scale: Option<&Tensor<'w>>,
        w2_scale: Option<&Tensor<'w>>,
        a13_scale: Option<&Tensor<'w>>,
        a2_scale: Option<&Tensor<'w>>,
    ) -> Result<()> {
        let (w13, w2) = (w13.dl(), w2.dl());
        let (s13, s2, a13, a2) = (
            opt_dl(w13_scale),
            opt_dl(w2_scale),
            opt_dl(a13_scale),
            opt_dl(a2_scale),
        );
        // SAFETY: the data outlives the runner ('w) and is not written while
        // borrowed; the DLTensors themselves are only read during the call.
        check(unsafe {
            sys::moe_runner_set_weights(
                self.as_raw(),
                &w13,
                &w2,
                opt_ptr(&s13),
                opt_ptr(&s2),
                opt_ptr(&a13),
                opt_ptr(&a2),
            )
        })
    }

    /// Workspace bytes for a run of up to `max_tokens` tokens with `columns` slots on `device`.
    pub fn workspace_size(&self, max_tokens: i64, columns: i32, device: Device) -> Result<usize> {
        let mut bytes = 0usize;
        // SAFETY: a live handle and a valid out pointer.
        check(unsafe {
            sys::moe_runner_workspace_size(self.as_raw(), max_tokens, columns, device.dl_type(), &mut bytes)
        })?;
        Ok(bytes)
    }

    /// output [T, H] = output_scale * sum_j w[t,j] * W2[id] . act(W13[id] . x[t]) over the local
    /// ids (from the dispatcher); hidden [T, H], local_ids [T, K] i32, topk_weights [T, K] f32,
    /// expert_offsets [E_loc + 1] i32, sorted_slots [T * K] i32.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        hidden: &Tensor<'_>,
        local_ids: &Tensor<'_>,
        topk_weights: &Tensor<'_>,
        expert_offsets: &Tensor<'_>,
        sorted_slots: &Tensor<'_>,
        output: &mut TensorMut<'_>,
        workspace: Workspace<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, ids, w) = (hidden.dl(), local_ids.dl(), topk_weights.dl());
        let (offsets, slots, mut y) = (expert_offsets.dl(), sorted_slots.dl(), output.dl());
        let (ws, ws_bytes) = workspace.raw();
        // SAFETY: live borrows of the described extent; the library validates
        // shapes, dtypes and devices before touching them.
        check(unsafe {
            sys::moe_runner_run(
                self.as_raw(),
                &x,
                &ids,
                &w,
                &offsets,
                &slots,
                &mut y,
                ws,
                ws_bytes,
                stream.as_raw(),
            )
        })
    }

    pub fn as_raw(&self) -> sys::moe_runner_t {
        self.handle.as_ptr()
    }
}

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nobody uses it after this.
        unsafe { sys::moe_runner_destroy(self.handle.as_ptr()) };
    }
}
