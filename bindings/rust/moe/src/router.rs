//! Router: logits [T, E] -> top-k expert ids [T, k + n_shared] (i32) and weights (f32).

use std::ptr::{self, NonNull};

use moe_sys as sys;

use crate::error::{check, defaulted_config, Error, Result};
use crate::tensor::{opt_dl, opt_dl_mut, opt_ptr, opt_ptr_mut, Device, Stream, Tensor, TensorMut, Workspace};
use crate::version::check_version;

/// A `moe_routing_method_t` (append-only in C, so a newtype: any i32 may be passed on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoutingMethod(pub i32);

impl RoutingMethod {
    pub const SOFTMAX_TOPK: RoutingMethod =
        RoutingMethod(sys::moe_routing_method_t_MOE_ROUTING_SOFTMAX_TOPK as i32);
    pub const TOPK_SOFTMAX: RoutingMethod =
        RoutingMethod(sys::moe_routing_method_t_MOE_ROUTING_TOPK_SOFTMAX as i32);
    pub const SIGMOID_TOPK: RoutingMethod =
        RoutingMethod(sys::moe_routing_method_t_MOE_ROUTING_SIGMOID_TOPK as i32);
    pub const DEEPSEEK_V3: RoutingMethod =
        RoutingMethod(sys::moe_routing_method_t_MOE_ROUTING_DEEPSEEK_V3 as i32);
    pub const GROUPED_SOFTMAX: RoutingMethod =
        RoutingMethod(sys::moe_routing_method_t_MOE_ROUTING_GROUPED_SOFTMAX as i32);
    pub const LLAMA4: RoutingMethod = RoutingMethod(sys::moe_routing_method_t_MOE_ROUTING_LLAMA4 as i32);

    /// Every method this crate was built with, in enum order.
    pub const ALL: [RoutingMethod; 6] = [
        RoutingMethod::SOFTMAX_TOPK,
        RoutingMethod::TOPK_SOFTMAX,
        RoutingMethod::SIGMOID_TOPK,
        RoutingMethod::DEEPSEEK_V3,
        RoutingMethod::GROUPED_SOFTMAX,
        RoutingMethod::LLAMA4,
    ];
}

/// Builder over `moe_router_config_t`, starting from `moe_router_config_default()`.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    raw: sys::moe_router_config_t,
}

impl RouterConfig {
    /// The library's defaults for `method`, with E and k set.
    pub fn new(method: RoutingMethod, num_experts: i32, top_k: i32) -> Result<Self> {
        check_version()?;
        // SAFETY: moe_router_config_t is a libmoe config and the closure calls its *_default().
        let mut raw: sys::moe_router_config_t =
            unsafe { defaulted_config(|p| sys::moe_router_config_default(p, method.0))? };
        raw.num_experts = num_experts;
        raw.top_k = top_k;
        Ok(RouterConfig { raw })
    }

    /// Expert groups (DEEPSEEK_V3, GROUPED_SOFTMAX): E % n_group == 0, keep `topk_group` of them.
    pub fn groups(mut self, n_group: i32, topk_group: i32) -> Self {
        self.raw.n_group = n_group;
        self.raw.topk_group = topk_group;
        self
    }
    pub fn renormalize(mut self, on: bool) -> Self {
        self.raw.renormalize = on as i32;
        self
    }
    pub fn routed_scaling_factor(mut self, factor: f32) -> Self {
        self.raw.routed_scaling_factor = factor;
        self
    }
    /// Leave the weights unscaled; the runner applies the factor to its output instead.
    pub fn scaling_on_output(mut self, on: bool) -> Self {
        self.raw.scaling_on_output = on as i32;
        self
    }
    pub fn num_fused_shared_experts(mut self, n: i32) -> Self {
        self.raw.num_fused_shared_experts = n;
        self
    }

    pub fn method(&self) -> RoutingMethod {
        RoutingMethod(self.raw.method)
    }
    pub fn as_raw(&self) -> &sys::moe_router_config_t {
        &self.raw
    }
    /// For fields this crate has no setter for.
    pub fn as_raw_mut(&mut self) -> &mut sys::moe_router_config_t {
        &mut self.raw
    }

    pub fn build(&self) -> Result<Router> {
        Router::new(self)
    }
}

/// An owned `moe_router_t`, destroyed on drop.
#[derive(Debug)]
pub struct Router {
    handle: NonNull<sys::moe_router_s>,
    num_experts: i32,
    columns: i32,
}

// SAFETY: moe.h: handles are immutable after creation and any number of
// threads may run one handle at once (the router has no workspace); the
// thread-local last error is read on the calling thread right after each call.
unsafe impl Send for Router {}
unsafe impl Sync for Router {}

impl Router {
    pub fn new(config: &RouterConfig) -> Result<Router> {
        check_version()?;
        let mut handle: sys::moe_router_t = ptr::null_mut();
        // SAFETY: the config is a complete struct whose struct_size is its own size.
        check(unsafe { sys::moe_router_create(&config.raw, &mut handle) })?;
        let handle = NonNull::new(handle)
            .ok_or_else(|| Error::new(crate::Status::INTERNAL_ERROR, "moe_router_create returned NULL"))?;
        let mut router = Router {
            handle,
            num_experts: config.raw.num_experts,
            columns: 0,
        };
        // SAFETY: a live handle and a valid out pointer.
        check(unsafe { sys::moe_router_output_columns(router.as_raw(), &mut router.columns) })?;
        Ok(router)
    }

    /// E, the routed experts.
    pub fn num_experts(&self) -> i32 {
        self.num_experts
    }

    /// Columns of topk_ids / topk_weights: top_k + num_fused_shared_experts.
    pub fn output_columns(&self) -> i32 {
        self.columns
    }

    /// Route `logits` [T, E] (f32/bf16/f16) into `topk_ids` [T, C] i32 and
    /// `topk_weights` [T, C] f32, C = output_columns(). `correction_bias`: [E]
    /// f32; `num_valid_tokens`: [1] i32 on the logits' device.
    pub fn route(
        &self,
        logits: &Tensor<'_>,
        correction_bias: Option<&Tensor<'_>>,
        num_valid_tokens: Option<&Tensor<'_>>,
        topk_ids: &mut TensorMut<'_>,
        topk_weights: &mut TensorMut<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (logits, bias, valid) = (logits.dl(), opt_dl(correction_bias), opt_dl(num_valid_tokens));
        let (mut ids, mut weights) = (topk_ids.dl(), topk_weights.dl());
        // SAFETY: the DLTensors describe live borrows of the right extent; the
        // library validates shapes, dtypes and devices before touching them.
        check(unsafe {
            sys::moe_router_run(
                self.as_raw(),
                &logits,
                opt_ptr(&bias),
                opt_ptr(&valid),
                &mut ids,
                &mut weights,
                stream.as_raw(),
            )
        })
    }

    /// Convenience for host f32 logits [T, E]: returns (ids, weights), each [T, C] row-major.
    pub fn route_f32(&self, logits: &[f32]) -> Result<(Vec<i32>, Vec<f32>)> {
        let e = self.num_experts as usize;
        if e == 0 || logits.len() % e != 0 {
            return Err(Error::invalid(format!(
                "logits: expected a multiple of E = {e} values, got {}",
                logits.len()
            )));
        }
        let t = logits.len() / e;
        let c = self.columns as usize;
        let (mut ids, mut weights) = (vec![-1i32; t * c], vec![f32::NAN; t * c]);
        let shape = [t as i64, c as i64];
        self.route(
            &Tensor::f32(logits, &[t as i64, e as i64])?,
            None,
            None,
            &mut TensorMut::i32(&mut ids, &shape)?,
            &mut TensorMut::f32(&mut weights, &shape)?,
            Stream::DEFAULT,
        )?;
        Ok((ids, weights))
    }

    /// Workspace bytes of `route_hidden` for up to `max_tokens` tokens of hidden size `hidden_size`.
    pub fn hidden_workspace_size(&self, hidden_size: i32, max_tokens: i64, device: Device) -> Result<usize> {
        let mut bytes = 0usize;
        // SAFETY: a live handle and a valid out pointer.
        check(unsafe {
            sys::moe_router_hidden_workspace_size(
                self.as_raw(),
                hidden_size,
                max_tokens,
                device.dl_type(),
                &mut bytes,
            )
        })?;
        Ok(bytes)
    }

    /// Route from hidden states (`moe_router_run_hidden`): logits = hidden [T, H] .
    /// gate_weight [E, H]^T computed in f32 (f32/f16/bf16 in any mix), then as
    /// `route`. `logits`: None, or [T, E] f32 that receives the logits.
    #[allow(clippy::too_many_arguments)]
    pub fn route_hidden(
        &self,
        hidden: &Tensor<'_>,
        gate_weight: &Tensor<'_>,
        correction_bias: Option<&Tensor<'_>>,
        num_valid_tokens: Option<&Tensor<'_>>,
        topk_ids: &mut TensorMut<'_>,
        topk_weights: &mut TensorMut<'_>,
        logits: Option<&mut TensorMut<'_>>,
        workspace: Workspace<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, wg) = (hidden.dl(), gate_weight.dl());
        let (bias, valid) = (opt_dl(correction_bias), opt_dl(num_valid_tokens));
        let (mut ids, mut weights, mut z) = (topk_ids.dl(), topk_weights.dl(), opt_dl_mut(logits));
        let (ws, ws_bytes) = workspace.raw();
        // SAFETY: live borrows of the described extent (outputs exclusively
        // borrowed); the library validates everything before touching them.
        check(unsafe {
            sys::moe_router_run_hidden(
                self.as_raw(),
                &x,
                &wg,
                opt_ptr(&bias),
                opt_ptr(&valid),
                &mut ids,
                &mut weights,
                opt_ptr_mut(&mut z),
                ws,
                ws_bytes,
                stream.as_raw(),
            )
        })
    }

    pub fn as_raw(&self) -> sys::moe_router_t {
        self.handle.as_ptr()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nobody uses it after this.
        unsafe { sys::moe_router_destroy(self.handle.as_ptr()) };
    }
}

/// Pack ids and weights into FlashInfer / TRT-LLM "routed" int32s:
/// `(id << 16) | bits(bf16(weight))`; id -1 stays -1 in the high half.
pub fn pack_topk(
    topk_ids: &Tensor<'_>,
    topk_weights: &Tensor<'_>,
    packed: &mut TensorMut<'_>,
    stream: Stream,
) -> Result<()> {
    check_version()?;
    let (ids, weights, mut out) = (topk_ids.dl(), topk_weights.dl(), packed.dl());
    // SAFETY: as in Router::route.
    check(unsafe { sys::moe_pack_topk(&ids, &weights, &mut out, stream.as_raw()) })
}
