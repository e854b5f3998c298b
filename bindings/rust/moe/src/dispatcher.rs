//! Standard dispatcher: global expert ids -> local ids of this rank plus the
//! routing metadata the runner reads (counts, offsets, sorted slots).

use std::ptr::{self, NonNull};

use moe_sys as sys;

use crate::error::{check, defaulted_config, Error, Result};
use crate::tensor::{Device, Stream, Tensor, TensorMut, Workspace};
use crate::version::check_version;

/// Builder over `moe_dispatcher_config_t`, starting from `moe_dispatcher_config_default()`.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    raw: sys::moe_dispatcher_config_t,
    // Owned here so the pointer in `raw` is only set for the create call.
    mapping: Option<Vec<i32>>,
}

impl DispatcherConfig {
    /// One rank holding all `num_experts` experts, on the CPU.
    pub fn new(num_experts: i32) -> Result<Self> {
        check_version()?;
        // SAFETY: moe_dispatcher_config_t is a libmoe config and the closure calls its *_default().
        let mut raw: sys::moe_dispatcher_config_t =
            unsafe { defaulted_config(|p| sys::moe_dispatcher_config_default(p))? };
        raw.num_experts = num_experts;
        raw.local_expert_mapping = ptr::null();
        Ok(DispatcherConfig { raw, mapping: None })
    }

    /// Contiguous expert-parallel ranges: this rank holds experts
    /// [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size).
    pub fn expert_parallel(mut self, ep_rank: i32, ep_size: i32) -> Self {
        self.raw.ep_rank = ep_rank;
        self.raw.ep_size = ep_size;
        self
    }

    /// An explicit mapping [E]: global id -> local id in [0, num_local_experts) or -1.
    pub fn mapping(mut self, mapping: Vec<i32>, num_local_experts: i32) -> Self {
        self.mapping = Some(mapping);
        self.raw.num_local_experts = num_local_experts;
        self
    }

    /// The device the dispatcher runs on (default: CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.raw.device_type = device.dl_type();
        self.raw.device_id = match device {
            Device::Cpu => 0,
            Device::Cuda(id) => id,
        };
        self
    }

    /// The raw config (its mapping pointer is NULL; the mapping is attached at create).
    pub fn as_raw(&self) -> &sys::moe_dispatcher_config_t {
        &self.raw
    }
    pub fn as_raw_mut(&mut self) -> &mut sys::moe_dispatcher_config_t {
        &mut self.raw
    }

    pub fn build(&self) -> Result<Dispatcher> {
        Dispatcher::new(self)
    }
}

/// An owned `moe_dispatcher_t`, destroyed on drop.
#[derive(Debug)]
pub struct Dispatcher {
    handle: NonNull<sys::moe_dispatcher_s>,
    num_experts: i32,
    num_local_experts: i32,
}

// SAFETY: moe.h: handles are immutable after creation; concurrent dispatches
// are allowed, each with its own workspace (`Workspace` borrows its memory
// mutably, so two calls cannot share one) or with the internal one, which the
// library serializes. The last error is thread-local and read on the same thread.
unsafe impl Send for Dispatcher {}
unsafe impl Sync for Dispatcher {}

impl Dispatcher {
    pub fn new(config: &DispatcherConfig) -> Result<Dispatcher> {
        check_version()?;
        let mut raw = config.raw;
        if let Some(m) = &config.mapping {
            if m.len() != config.raw.num_experts.max(0) as usize {
                return Err(Error::invalid(format!(
                    "local_expert_mapping: expected {} entries (num_experts), got {}",
                    config.raw.num_experts,
                    m.len()
                )));
            }
            raw.local_expert_mapping = m.as_ptr();
        }
        let mut handle: sys::moe_dispatcher_t = ptr::null_mut();
        // SAFETY: raw is complete; the mapping (if any) has num_experts entries and is copied at create.
        check(unsafe { sys::moe_dispatcher_create(&raw, &mut handle) })?;
        let handle = NonNull::new(handle).ok_or_else(|| {
            Error::new(
                crate::Status::INTERNAL_ERROR,
                "moe_dispatcher_create returned NULL",
            )
        })?;
        let mut d = Dispatcher {
            handle,
            num_experts: config.raw.num_experts,
            num_local_experts: 0,
        };
        // SAFETY: a live handle and a valid out pointer.
        check(unsafe { sys::moe_dispatcher_num_local_experts(d.as_raw(), &mut d.num_local_experts) })?;
        Ok(d)
    }

    /// E, the global experts (ids accepted: [-1, E)).
    pub fn num_experts(&self) -> i32 {
        self.num_experts
    }

    /// E_loc, the experts of this rank.
    pub fn num_local_experts(&self) -> i32 {
        self.num_local_experts
    }

    /// (mapping, mask), each [E]: global -> local id or -1, and 1 iff held here.
    pub fn mapping(&self) -> Result<(Vec<i32>, Vec<i32>)> {
        let n = self.num_experts.max(0) as usize;
        let (mut mapping, mut mask) = (vec![0i32; n], vec![0i32; n]);
        // SAFETY: both buffers hold exactly `len` = E entries.
        check(unsafe {
            sys::moe_dispatcher_get_mapping(self.as_raw(), mapping.as_mut_ptr(), mask.as_mut_ptr(), n as i64)
        })?;
        Ok((mapping, mask))
    }

    /// Workspace bytes for a dispatch of up to `max_tokens` tokens with `columns` slots each.
    pub fn workspace_size(&self, max_tokens: i64, columns: i32) -> Result<usize> {
        let mut bytes = 0usize;
        // SAFETY: a live handle and a valid out pointer.
        check(unsafe { sys::moe_dispatcher_workspace_size(self.as_raw(), max_tokens, columns, &mut bytes) })?;
        Ok(bytes)
    }

    /// topk_ids [T, K] global -> local_ids [T, K], expert_counts [E_loc],
    /// expert_offsets [E_loc + 1], sorted_slots [T * K]; all i32.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &self,
        topk_ids: &Tensor<'_>,
        local_ids: &mut TensorMut<'_>,
        expert_counts: &mut TensorMut<'_>,
        expert_offsets: &mut TensorMut<'_>,
        sorted_slots: &mut TensorMut<'_>,
        workspace: Workspace<'_>,
        stream: Stream,
    ) -> Result<()> {
        let ids = topk_ids.dl();
        let (mut local, mut counts) = (local_ids.dl(), expert_counts.dl());
        let (mut offsets, mut slots) = (expert_offsets.dl(), sorted_slots.dl());
        let (ws, ws_bytes) = workspace.raw();
        // SAFETY: live borrows of the described extent; the library validates
        // shapes, dtypes and devices before touching them.
        check(unsafe {
            sys::moe_dispatcher_dispatch(
                self.as_raw(),
                &ids,
                &mut local,
                &mut counts,
                &mut offsets,
                &mut slots,
                ws,
                ws_bytes,
                stream.as_raw(),
            )
        })
    }

    pub fn as_raw(&self) -> sys::moe_dispatcher_t {
        self.handle.as_ptr()
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nobody uses it after this.
        unsafe { sys::moe_dispatcher_destroy(self.handle.as_ptr()) };
    }
}
