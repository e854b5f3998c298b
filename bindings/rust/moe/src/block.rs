//! The complete MoE block in one call (`moe_block_forward`): gate projection ->
//! route -> dispatch -> routed experts -> shared experts -> sum.

use std::ptr;

use moe_sys as sys;

use crate::dispatcher::Dispatcher;
use crate::error::{check, Error, Result};
use crate::router::Router;
use crate::runner::Runner;
use crate::shared::SharedExperts;
use crate::tensor::{opt_dl, opt_ptr, Device, Stream, Tensor, TensorMut, Workspace};

/// block(x) = routed(x) + shared(x); `shared` None means no shared experts.
#[derive(Debug)]
pub struct Block<'w> {
    pub router: Router,
    pub dispatcher: Dispatcher,
    pub runner: Runner<'w>,
    pub shared: Option<SharedExperts<'w>>,
}

impl<'w> Block<'w> {
    pub fn new(
        router: Router,
        dispatcher: Dispatcher,
        runner: Runner<'w>,
        shared: Option<SharedExperts<'w>>,
    ) -> Self {
        Block {
            router,
            dispatcher,
            runner,
            shared,
        }
    }

    fn shared_raw(&self) -> sys::moe_shared_experts_t {
        self.shared.as_ref().map_or(ptr::null_mut(), |s| s.as_raw())
    }

    /// Workspace bytes of `forward` for up to `max_tokens` tokens on `device`.
    pub fn workspace_size(&self, max_tokens: i64, device: Device) -> Result<usize> {
        let mut bytes = 0usize;
        // SAFETY: live handles (shared may be NULL) and a valid out pointer.
        check(unsafe {
            sys::moe_block_workspace_size(
                self.router.as_raw(),
                self.dispatcher.as_raw(),
                self.runner.as_raw(),
                self.shared_raw(),
                max_tokens,
                device.dl_type(),
                &mut bytes,
            )
        })?;
        Ok(bytes)
    }

    /// output [T, H] = block(hidden [T, H]) with the gate gate_weight [E, H];
    /// `correction_bias` [E] f32 and `num_valid_tokens` [1] i32 as in `Router::route`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden: &Tensor<'_>,
        gate_weight: &Tensor<'_>,
        correction_bias: Option<&Tensor<'_>>,
        num_valid_tokens: Option<&Tensor<'_>>,
        output: &mut TensorMut<'_>,
        workspace: Workspace<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, wg, mut y) = (hidden.dl(), gate_weight.dl(), output.dl());
        let (bias, valid) = (opt_dl(correction_bias), opt_dl(num_valid_tokens));
        let (ws, ws_bytes) = workspace.raw();
        // SAFETY: live borrows of the described extent; the library validates
        // shapes, dtypes and devices before touching them.
        check(unsafe {
            sys::moe_block_forward(
                self.router.as_raw(),
                self.dispatcher.as_raw(),
                self.runner.as_raw(),
                self.shared_raw(),
                &x,
                &wg,
                opt_ptr(&bias),
                opt_ptr(&valid),
                &mut y,
                ws,
                ws_bytes,
                stream.as_raw(),
            )
        })
    }

    /// Convenience for host f32 data: hidden [T, H], gate_weight [E, H] row-major; returns [T, H].
    pub fn forward_f32(
        &self,
        hidden: &[f32],
        gate_weight: &[f32],
        correction_bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let h = self.runner.config().hidden_size.max(0) as usize;
        let e = self.router.num_experts().max(0) as usize;
        if h == 0 || hidden.len() % h != 0 {
            return Err(Error::invalid(format!(
                "hidden: expected a multiple of H = {h} values, got {}",
                hidden.len()
            )));
        }
        let t = hidden.len() / h;
        let bias = correction_bias.map(|b| Tensor::f32(b, &[e as i64])).transpose()?;
        let mut out = vec![f32::NAN; t * h];
        self.forward(
            &Tensor::f32(hidden, &[t as i64, h as i64])?,
            &Tensor::f32(gate_weight, &[e as i64, h as i64])
                .map_err(|err| Error::invalid(format!("gate_weight: {}", err.message)))?,
            bias.as_ref(),
            None,
            &mut TensorMut::f32(&mut out, &[t as i64, h as i64])?,
            Workspace::internal(),
            Stream::DEFAULT,
        )?;
        Ok(out)
    }
}
