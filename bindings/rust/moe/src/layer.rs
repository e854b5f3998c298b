//! The one-call layer: route -> dispatch -> run (`moe_layer_forward`).

use moe_sys as sys;

use crate::dispatcher::Dispatcher;
use crate::error::{check, Error, Result};
use crate::router::Router;
use crate::runner::Runner;
use crate::tensor::{opt_dl, opt_ptr, Device, Stream, Tensor, TensorMut, Workspace};

/// A router, a dispatcher and a runner used together as one MoE layer.
#[derive(Debug)]
pub struct Layer<'w> {
    pub router: Router,
    pub dispatcher: Dispatcher,
    pub runner: Runner<'w>,
}

impl<'w> Layer<'w> {
    pub fn new(router: Router, dispatcher: Dispatcher, runner: Runner<'w>) -> Self {
        Layer {
            router,
            dispatcher,
            runner,
        }
    }

    /// Workspace bytes for `forward` with up to `max_tokens` tokens on `device`.
    pub fn workspace_size(&self, max_tokens: i64, device: Device) -> Result<usize> {
        let mut bytes = 0usize;
        // SAFETY: live handles and a valid out pointer.
        check(unsafe {
            sys::moe_layer_workspace_size(
                self.router.as_raw(),
                self.dispatcher.as_raw(),
                self.runner.as_raw(),
                max_tokens,
                device.dl_type(),
                &mut bytes,
            )
        })?;
        Ok(bytes)
    }

    /// output [T, H] = MoE(hidden [T, H]) routed by logits [T, E].
    /// `correction_bias` and `num_valid_tokens` as in `Router::route`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden: &Tensor<'_>,
        logits: &Tensor<'_>,
        correction_bias: Option<&Tensor<'_>>,
        num_valid_tokens: Option<&Tensor<'_>>,
        output: &mut TensorMut<'_>,
        workspace: Workspace<'_>,
        stream: Stream,
    ) -> Result<()> {
        let (x, z, mut y) = (hidden.dl(), logits.dl(), output.dl());
        let (bias, valid) = (opt_dl(correction_bias), opt_dl(num_valid_tokens));
        let (ws, ws_bytes) = workspace.raw();
        // SAFETY: live borrows of the described extent; the library validates
        // shapes, dtypes and devices before touching them.
        check(unsafe {
            sys::moe_layer_forward(
                self.router.as_raw(),
                self.dispatcher.as_raw(),
                self.runner.as_raw(),
                &x,
                &z,
                opt_ptr(&bias),
                opt_ptr(&valid),
                &mut y,
                ws,
                ws_bytes,
                stream.as_raw(),
            )
        })
    }

    /// Convenience for host f32 data: hidden [T, H] and logits [T, E] row-major; returns [T, H].
    pub fn forward_f32(&self, hidden: &[f32], logits: &[f32]) -> Result<Vec<f32>> {
        let h = self.runner.config().hidden_size.max(0) as usize;
        let e = self.router.num_experts().max(0) as usize;
        if h == 0 || hidden.len() % h != 0 {
            return Err(Error::invalid(format!(
                "hidden: expected a multiple of H = {h} values, got {}",
                hidden.len()
            )));
        }
        let t = hidden.len() / h;
        if logits.len() != t * e {
            return Err(Error::invalid(format!(
                "logits: expected T * E = {t} * {e} = {} values, got {}",
                t * e,
                logits.len()
            )));
        }
        let mut out = vec![f32::NAN; t * h];
        self.forward(
            &Tensor::f32(hidden, &[t as i64, h as i64])?,
            &Tensor::f32(logits, &[t as i64, e as i64])?,
            None,
            None,
            &mut TensorMut::f32(&mut out, &[t as i64, h as i64])?,
            Workspace::internal(),
            Stream::DEFAULT,
        )?;
        Ok(out)
    }
}
