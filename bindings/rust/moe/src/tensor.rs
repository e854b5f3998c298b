//! Borrowed tensor views passed to libmoe as DLPack `DLTensor`s, plus the
//! stream and workspace arguments.
//!
//! Host views are built from slices: the shape is checked against the slice
//! length here (an `Err`, never a panic), so the library can never read past
//! a slice. Device views (CUDA) come from `unsafe` raw-pointer constructors.

use std::alloc::{self, Layout};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use moe_sys as sys;

use crate::error::{Error, Result};

/// Element types libmoe accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    /// FP8 E4M3 (fn variant) bits, for FP8 weights.
    E4M3,
}

/// The 16-bit float formats a `u16` slice may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HalfType {
    BF16,
    F16,
}

impl From<HalfType> for DType {
    fn from(h: HalfType) -> DType {
        match h {
            HalfType::BF16 => DType::BF16,
            HalfType::F16 => DType::F16,
        }
    }
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::E4M3 => 1,
        }
    }

    pub(crate) fn dl(self) -> sys::DLDataType {
        let (code, bits) = match self {
            DType::F32 => (sys::DLDataTypeCode_kDLFloat, 32),
            DType::F16 => (sys::DLDataTypeCode_kDLFloat, 16),
            DType::BF16 => (sys::DLDataTypeCode_kDLBfloat, 16),
            DType::I32 => (sys::DLDataTypeCode_kDLInt, 32),
            DType::E4M3 => (sys::MOE_DLPACK_CODE_FLOAT8_E4M3FN, 8),
        };
        sys::DLDataType {
            code: code as u8,
            bits,
            lanes: 1,
        }
    }
}

/// Where a tensor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device ordinal.
    Cuda(i32),
}

impl Device {
    pub(crate) fn dl_type(self) -> i32 {
        match self {
            Device::Cpu => sys::DLDeviceType_kDLCPU as i32,
            Device::Cuda(_) => sys::DLDeviceType_kDLCUDA as i32,
        }
    }

    fn dl(self) -> sys::DLDevice {
        match self {
            Device::Cpu => sys::DLDevice {
                device_type: sys::DLDeviceType_kDLCPU,
                device_id: 0,
            },
            Device::Cuda(id) => sys::DLDevice {
                device_type: sys::DLDeviceType_kDLCUDA,
                device_id: id,
            },
        }
    }
}

/// Most dimensions any libmoe tensor has (weights and block scales: 3).
pub const MAX_NDIM: usize = 4;

/// Everything a view knows; the DLTensor is built from it at call time so
/// that its shape pointer points into a view that cannot move during the call.
#[derive(Clone, Copy, Debug)]
struct Meta {
    data: *mut c_void,
    dtype: DType,
    device: Device,
    ndim: usize,
    shape: [i64; MAX_NDIM],
}

/// Element count of `shape`, or an error naming what is wrong with it.
fn checked_numel(shape: &[i64]) -> Result<usize> {
    if shape.len() > MAX_NDIM {
        return Err(Error::invalid(format!(
            "tensor shape {shape:?}: expected at most {MAX_NDIM} dimensions, got {}",
            shape.len()
        )));
    }
    let mut n: usize = 1;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| {
            Error::invalid(format!(
                "tensor shape {shape:?}: dimensions must be >= 0, got {d}"
            ))
        })?;
        n = n
            .checked_mul(d)
            .ok_or_else(|| Error::invalid(format!("tensor shape {shape:?}: element count overflows")))?;
    }
    Ok(n)
}

impl Meta {
    fn new(data: *mut c_void, dtype: DType, device: Device, shape: &[i64]) -> Meta {
        let mut dims = [0i64; MAX_NDIM];
        dims[..shape.len()].copy_from_slice(shape);
        Meta {
            data,
            dtype,
            device,
            ndim: shape.len(),
            shape: dims,
        }
    }

    /// A view of `len` elements of `dtype` at `data`, when `shape` covers exactly `len`.
    fn host(data: *mut c_void, len: usize, dtype: DType, shape: &[i64]) -> Result<Meta> {
        let numel = checked_numel(shape)?;
        if numel != len {
            return Err(Error::invalid(format!(
                "tensor shape {shape:?} ({dtype:?}): expected a slice of {numel} elements, got {len}"
            )));
        }
        Ok(Meta::new(data, dtype, Device::Cpu, shape))
    }

    /// A raw view; only the shape can be checked.
    fn raw(data: *mut c_void, dtype: DType, shape: &[i64], device: Device) -> Result<Meta> {
        let numel = checked_numel(shape)?;
        if data.is_null() && numel != 0 {
            return Err(Error::invalid(format!(
                "tensor shape {shape:?}: data pointer is NULL"
            )));
        }
        numel
            .checked_mul(dtype.size_bytes())
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid(format!("tensor shape {shape:?}: byte size overflows")))?;
        Ok(Meta::new(data, dtype, device, shape))
    }

    fn shape(&self) -> &[i64] {
        &self.shape[..self.ndim]
    }

    /// The DLTensor for one call: it points into `self`, so it must not outlive it.
    fn dl(&self) -> sys::DLTensor {
        sys::DLTensor {
            data: self.data,
            device: self.device.dl(),
            ndim: self.ndim as i32,
            dtype: self.dtype.dl(),
            // libmoe only reads the shape (the DLTensor is passed as const or as an output whose
            // shape is input); NULL strides mean compact row-major in DLPack.
            shape: self.shape.as_ptr() as *mut i64,
            strides: ptr::null_mut(),
            byte_offset: 0,
        }
    }
}

/// A read-only tensor view that borrows its memory for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    meta: Meta,
    _borrow: PhantomData<&'a [u8]>,
}

/// A writable tensor view that borrows its memory exclusively for `'a`.
#[derive(Debug)]
pub struct TensorMut<'a> {
    meta: Meta,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> Tensor<'a> {
    fn from_meta(meta: Meta) -> Self {
        Tensor {
            meta,
            _borrow: PhantomData,
        }
    }

    /// An f32 view of `data` with `shape` (row-major); Err unless the shape covers the slice exactly.
    pub fn f32(data: &'a [f32], shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_ptr() as *mut c_void, data.len(), DType::F32, shape).map(Self::from_meta)
    }

    /// A bf16 or f16 view of raw 16-bit patterns.
    pub fn half(data: &'a [u16], dtype: HalfType, shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_ptr() as *mut c_void, data.len(), dtype.into(), shape).map(Self::from_meta)
    }

    /// An int32 view (expert ids, routing metadata, num_valid_tokens).
    pub fn i32(data: &'a [i32], shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_ptr() as *mut c_void, data.len(), DType::I32, shape).map(Self::from_meta)
    }

    /// An FP8 E4M3 view of raw byte patterns (FP8 weights).
    pub fn e4m3(data: &'a [u8], shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_ptr() as *mut c_void, data.len(), DType::E4M3, shape).map(Self::from_meta)
    }

    /// A view of memory this crate cannot check, e.g. a CUDA device pointer.
    ///
    /// # Safety
    /// `data` must point to a contiguous row-major array of `shape` elements of
    /// `dtype` on `device`, valid for reads and not written by anyone else for
    /// `'a` (and on the GPU, until the work queued on the stream of every call
    /// that uses the view has finished). A call with device views must get a
    /// workspace on that device: `Workspace::internal()` or `Workspace::from_raw`.
    pub unsafe fn from_raw(data: *const c_void, dtype: DType, shape: &[i64], device: Device) -> Result<Self> {
        Meta::raw(data as *mut c_void, dtype, shape, device).map(Self::from_meta)
    }

    pub fn shape(&self) -> &[i64] {
        self.meta.shape()
    }
    pub fn dtype(&self) -> DType {
        self.meta.dtype
    }
    pub fn device(&self) -> Device {
        self.meta.device
    }
    pub(crate) fn dl(&self) -> sys::DLTensor {
        self.meta.dl()
    }
}

impl<'a> TensorMut<'a> {
    fn from_meta(meta: Meta) -> Self {
        TensorMut {
            meta,
            _borrow: PhantomData,
        }
    }

    pub fn f32(data: &'a mut [f32], shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_mut_ptr() as *mut c_void, data.len(), DType::F32, shape).map(Self::from_meta)
    }

    pub fn half(data: &'a mut [u16], dtype: HalfType, shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_mut_ptr() as *mut c_void, data.len(), dtype.into(), shape).map(Self::from_meta)
    }

    pub fn i32(data: &'a mut [i32], shape: &[i64]) -> Result<Self> {
        Meta::host(data.as_mut_ptr() as *mut c_void, data.len(), DType::I32, shape).map(Self::from_meta)
    }

    /// A writable view of memory this crate cannot check, e.g. a CUDA device pointer.
    ///
    /// # Safety
    /// As `Tensor::from_raw`, and `data` must be valid for writes and not
    /// accessed by anyone else for `'a`.
    pub unsafe fn from_raw(data: *mut c_void, dtype: DType, shape: &[i64], device: Device) -> Result<Self> {
        Meta::raw(data, dtype, shape, device).map(Self::from_meta)
    }

    /// A read-only view of the same memory, for as long as this one is borrowed.
    pub fn view(&self) -> Tensor<'_> {
        Tensor::from_meta(self.meta)
    }

    pub fn shape(&self) -> &[i64] {
        self.meta.shape()
    }
    pub fn dtype(&self) -> DType {
        self.meta.dtype
    }
    pub fn device(&self) -> Device {
        self.meta.device
    }
    pub(crate) fn dl(&self) -> sys::DLTensor {
        self.meta.dl()
    }
}

// SAFETY: a view is a borrow of plain numeric data (like &[T] / &mut [T] of a
// Send + Sync T); the raw constructors put the rest on the caller.
unsafe impl Send for Tensor<'_> {}
unsafe impl Sync for Tensor<'_> {}
unsafe impl Send for TensorMut<'_> {}
unsafe impl Sync for TensorMut<'_> {}

/// The DLTensor of an optional input, and a pointer to it (NULL for None).
pub(crate) fn opt_dl(t: Option<&Tensor<'_>>) -> Option<sys::DLTensor> {
    t.map(|t| t.dl())
}
pub(crate) fn opt_ptr(t: &Option<sys::DLTensor>) -> *const sys::DLTensor {
    t.as_ref().map_or(ptr::null(), |t| t as *const sys::DLTensor)
}
/// The same for an optional output.
pub(crate) fn opt_dl_mut(t: Option<&mut TensorMut<'_>>) -> Option<sys::DLTensor> {
    t.map(|t| t.dl())
}
pub(crate) fn opt_ptr_mut(t: &mut Option<sys::DLTensor>) -> *mut sys::DLTensor {
    t.as_mut().map_or(ptr::null_mut(), |t| t as *mut sys::DLTensor)
}

/// A CUDA stream (`cudaStream_t`) passed through to the library; ignored by the CPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(*mut c_void);

impl Stream {
    /// The legacy default stream (and the only sensible value for CPU tensors).
    pub const DEFAULT: Stream = Stream(ptr::null_mut());

    /// # Safety
    /// `stream` is NULL or a live `cudaStream_t` of the device of the tensors
    /// it is used with, and stays alive while work queued on it runs.
    pub unsafe fn from_raw(stream: *mut c_void) -> Stream {
        Stream(stream)
    }

    pub fn as_raw(self) -> *mut c_void {
        self.0
    }
}

impl Default for Stream {
    fn default() -> Self {
        Stream::DEFAULT
    }
}

// SAFETY: a CUDA stream handle may be used from any host thread.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

/// Alignment libmoe requires of a caller workspace.
pub const WORKSPACE_ALIGN: usize = 256;

/// The workspace argument of a run: the handle's own (allocated and kept by
/// the library, calls serialized on it) or caller memory used by this call only.
#[derive(Debug)]
pub struct Workspace<'a> {
    ptr: *mut c_void,
    bytes: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl Workspace<'static> {
    /// Let the handle use the workspace it owns (NULL / 0 in the C API).
    pub fn internal() -> Self {
        Workspace {
            ptr: ptr::null_mut(),
            bytes: 0,
            _borrow: PhantomData,
        }
    }
}

impl<'a> Workspace<'a> {
    /// Host memory for a run on CPU tensors (not CUDA ones); each concurrent call needs its own.
    pub fn host(buffer: &'a mut HostWorkspace) -> Self {
        Workspace {
            ptr: buffer.ptr.as_ptr() as *mut c_void,
            bytes: buffer.bytes,
            _borrow: PhantomData,
        }
    }

    /// Caller memory, e.g. a CUDA allocation.
    ///
    /// # Safety
    /// `ptr` is 256-byte aligned, valid for reads and writes of `bytes` bytes
    /// on the device of the tensors of the call, and used by nobody else until
    /// the call (and on the GPU, its queued work) has finished.
    pub unsafe fn from_raw(ptr: *mut c_void, bytes: usize) -> Self {
        Workspace {
            ptr,
            bytes,
            _borrow: PhantomData,
        }
    }

    pub(crate) fn raw(&self) -> (*mut c_void, usize) {
        (self.ptr, self.bytes)
    }
}

impl Default for Workspace<'static> {
    fn default() -> Self {
        Workspace::internal()
    }
}

/// A 256-byte aligned host buffer for `Workspace::host`.
#[derive(Debug)]
pub struct HostWorkspace {
    ptr: NonNull<u8>,
    bytes: usize,
    layout: Layout,
}

impl HostWorkspace {
    /// At least `bytes` bytes (a zero-byte request still gets a real allocation).
    pub fn new(bytes: usize) -> Result<Self> {
        let layout = Layout::from_size_align(bytes.max(WORKSPACE_ALIGN), WORKSPACE_ALIGN)
            .map_err(|_| Error::invalid(format!("workspace of {bytes} bytes: too large")))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::new(
                crate::Status::OUT_OF_MEMORY,
                format!("workspace of {bytes} bytes: host allocation failed"),
            )
        })?;
        Ok(HostWorkspace {
            ptr,
            bytes: layout.size(),
            layout,
        })
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for HostWorkspace {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: owns plain bytes, like Vec<u8>.
unsafe impl Send for HostWorkspace {}
unsafe impl Sync for HostWorkspace {}
