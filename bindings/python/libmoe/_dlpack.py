"""DLPack structs (dlpack.h 0.6 layout) and borrowing arrays as DLTensors.

Arrays come from NumPy, PyTorch, anything with __cuda_array_interface__
(CuPy, Numba) or anything with __dlpack__ (JAX, CuPy, ...). Nothing is
copied: a Tensor points at the caller's memory and holds a reference to every
object that keeps that memory (and its shape/strides arrays) alive.
"""

from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

# DLDeviceType
kDLCPU = 1
kDLCUDA = 2
kDLCUDAHost = 3
kDLCUDAManaged = 13

# DLDataTypeCode
kDLInt = 0
kDLUInt = 1
kDLFloat = 2
kDLBfloat = 4
kDLComplex = 5
kDLBool = 6
# MOE_DLPACK_CODE_FLOAT8_E4M3FN in moe.h (DLPack >= 1.0's kDLFloat8_e4m3fn).
kDLFloat8_e4m3fn = 10


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))),
]

_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

# Names the caller may give for `dtype=`: how to read uint16 / uint8 arrays.
_REINTERPRET = {
    "bf16": (kDLUInt, 16, kDLBfloat),
    "bfloat16": (kDLUInt, 16, kDLBfloat),
    "e4m3": (kDLUInt, 8, kDLFloat8_e4m3fn),
    "float8_e4m3fn": (kDLUInt, 8, kDLFloat8_e4m3fn),
}

_DTYPE_NAMES = {
    (kDLFloat, 16): "f16", (kDLFloat, 32): "f32", (kDLFloat, 64): "f64",
    (kDLBfloat, 16): "bf16", (kDLFloat8_e4m3fn, 8): "e4m3",
    (kDLInt, 8): "int8", (kDLInt, 16): "int16", (kDLInt, 32): "int32", (kDLInt, 64): "int64",
    (kDLUInt, 8): "uint8", (kDLUInt, 16): "uint16", (kDLUInt, 32): "uint32", (kDLUInt, 64): "uint64",
}

_TORCH_DTYPES = {
    "torch.float32": (kDLFloat, 32), "torch.float16": (kDLFloat, 16),
    "torch.bfloat16": (kDLBfloat, 16), "torch.float64": (kDLFloat, 64),
    "torch.float8_e4m3fn": (kDLFloat8_e4m3fn, 8),
    "torch.int32": (kDLInt, 32), "torch.int64": (kDLInt, 64), "torch.int16": (kDLInt, 16),
    "torch.int8": (kDLInt, 8), "torch.uint8": (kDLUInt, 8), "torch.bool": (kDLBool, 8),
}

_TORCH_DEVICES = {"cpu": kDLCPU, "cuda": kDLCUDA}


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


def _is_cupy(obj: Any) -> bool:
    return type(obj).__module__.startswith("cupy")


def _numpy_code(dt: np.dtype, name: str) -> Tuple[int, int]:
    # ml_dtypes registers these as kind 'V' with their own names.
    if dt.name == "bfloat16":
        return kDLBfloat, 16
    if dt.name == "float8_e4m3fn":
        return kDLFloat8_e4m3fn, 8
    kinds = {"f": kDLFloat, "i": kDLInt, "u": kDLUInt, "b": kDLBool, "c": kDLComplex}
    if dt.kind not in kinds or dt.byteorder == ">":
        raise TypeError("libmoe: %s: NumPy dtype %s has no DLPack equivalent" % (name, dt))
    return kinds[dt.kind], dt.itemsize * 8


def _typestr_code(typestr: str, name: str) -> Tuple[int, int]:
    kinds = {"f": kDLFloat, "i": kDLInt, "u": kDLUInt, "b": kDLBool, "c": kDLComplex}
    if typestr[0] == ">" or typestr[1] not in kinds:
        raise TypeError("libmoe: %s: array typestr %r has no DLPack equivalent" % (name, typestr))
    return kinds[typestr[1]], int(typestr[2:]) * 8


def dtype_name(code: int, bits: int) -> str:
    return _DTYPE_NAMES.get((code, bits), "code%d/%dbit" % (code, bits))


class Tensor:
    """A caller's array seen as a DLTensor, kept valid while this object lives.

    `framework` is "numpy", "torch", "cupy" or "dlpack" (any other producer);
    it decides how outputs are allocated for a call whose inputs came from it.
    """

    def __init__(self, obj: Any, name: str, data: int, shape: Sequence[int],
                 strides: Optional[Sequence[int]], code: int, bits: int,
                 device_type: int, device_id: int, framework: str,
                 keep: Sequence[Any] = (), byte_offset: int = 0,
                 stream_hint: Optional[int] = None):
        self.obj = obj
        self.name = name
        self.framework = framework
        self.shape = tuple(int(s) for s in shape)
        self.device_type = int(device_type)
        self.device_id = int(device_id)
        self.code, self.bits = code, bits
        self.stream_hint = stream_hint
        ndim = len(self.shape)
        if strides is None:
            strides = _compact_strides(self.shape)
        strides = _normalize_strides(self.shape, strides)
        self._shape_arr = (ctypes.c_int64 * max(ndim, 1))(*self.shape)
        self._strides_arr = (ctypes.c_int64 * max(ndim, 1))(*strides)
        self.strides = tuple(strides)
        self._keep: List[Any] = [obj, *keep]
        self.dl = DLTensor()
        self.dl.data = data or None
        self.dl.device = DLDevice(self.device_type, self.device_id)
        self.dl.ndim = ndim
        self.dl.dtype = DLDataType(code, bits, 1)
        self.dl.shape = ctypes.cast(self._shape_arr, ctypes.POINTER(ctypes.c_int64))
        self.dl.strides = ctypes.cast(self._strides_arr, ctypes.POINTER(ctypes.c_int64))
        self.dl.byte_offset = byte_offset

    @property
    def ptr(self) -> "ctypes._Pointer":
        return ctypes.pointer(self.dl)

    @property
    def is_cuda(self) -> bool:
        return self.device_type in (kDLCUDA, kDLCUDAManaged)

    @property
    def dtype(self) -> str:
        return dtype_name(self.code, self.bits)

    @property
    def address(self) -> int:
        return (self.dl.data or 0) + self.dl.byte_offset

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * ((self.bits + 7) // 8)

    def is_contiguous(self) -> bool:
        return self.strides == tuple(_compact_strides(self.shape))


def _compact_strides(shape: Sequence[int]) -> List[int]:
    strides, acc = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = acc
        acc *= max(int(shape[i]), 1)
    return strides


def _normalize_strides(shape: Sequence[int], strides: Sequence[int]) -> List[int]:
    """The stride of a size-1 dimension is meaningless (frameworks put anything
    there); give it the compact value so contiguity checks see the truth."""
    compact = _compact_strides(shape)
    return [compact[i] if shape[i] == 1 else int(strides[i]) for i in range(len(shape))]


def _reinterpret(code: int, bits: int, dtype: Optional[str], name: str) -> Tuple[int, int]:
    if dtype is None:
        return code, bits
    if dtype not in _REINTERPRET:
        raise ValueError("libmoe: dtype=%r is not one of %s" % (dtype, sorted(_REINTERPRET)))
    from_code, from_bits, to_code = _REINTERPRET[dtype]
    if (code, bits) == (from_code, from_bits):
        return to_code, bits
    return code, bits


def _from_numpy(arr: np.ndarray, name: str, dtype: Optional[str]) -> Tensor:
    code, bits = _reinterpret(*_numpy_code(arr.dtype, name), dtype, name)
    item = arr.itemsize
    if any(s % item for s in arr.strides):
        raise ValueError("libmoe: %s: NumPy strides %s are not a multiple of the item size %d"
                         % (name, arr.strides, item))
    strides = [s // item for s in arr.strides]
    return Tensor(arr, name, arr.ctypes.data, arr.shape, strides, code, bits,
                  kDLCPU, 0, "numpy")


def _from_torch(t: Any, name: str, dtype: Optional[str]) -> Tensor:
    key = str(t.dtype)
    if key not in _TORCH_DTYPES:
        raise TypeError("libmoe: %s: torch dtype %s has no DLPack equivalent" % (name, key))
    code, bits = _reinterpret(*_TORCH_DTYPES[key], dtype, name)
    dev = t.device
    if dev.type not in _TORCH_DEVICES:
        raise TypeError("libmoe: %s: torch device %s is not supported (cpu or cuda)" % (name, dev))
    dev_id = dev.index if dev.index is not None else 0
    return Tensor(t, name, t.data_ptr(), tuple(t.shape), t.stride(), code, bits,
                  _TORCH_DEVICES[dev.type], dev_id, "torch")


def _from_cai(obj: Any, name: str, dtype: Optional[str]) -> Tensor:
    cai = obj.__cuda_array_interface__
    shape = tuple(cai["shape"])
    code, bits = _reinterpret(*_typestr_code(cai["typestr"], name), dtype, name)
    item = bits // 8
    strides = cai.get("strides")
    if strides is not None:
        if any(s % item for s in strides):
            raise ValueError("libmoe: %s: strides %s are not a multiple of the item size %d"
                             % (name, strides, item))
        strides = [s // item for s in strides]
    dev = getattr(obj, "device", None)
    dev_id = int(getattr(dev, "id", 0) or 0)
    return Tensor(obj, name, cai["data"][0], shape, strides, code, bits, kDLCUDA, dev_id,
                  "cupy" if _is_cupy(obj) else "dlpack", stream_hint=cai.get("stream"))


def _from_dlpack(obj: Any, name: str, dtype: Optional[str], stream: Optional[int]) -> Tensor:
    dev_type = None
    if hasattr(obj, "__dlpack_device__"):
        dev_type, _ = obj.__dlpack_device__()
    if dev_type in (kDLCUDA, kDLCUDAManaged) and stream is not None:
        # The producer orders its pending work before `stream` (DLPack protocol,
        # where the legacy default stream is 1: 0 is reserved as ambiguous).
        capsule = obj.__dlpack__(stream=1 if stream == 0 else stream)
    else:
        capsule = obj.__dlpack__()
    # Borrow, never consume: the capsule keeps its name, so its destructor
    # calls the producer's deleter when we drop it after the call.
    addr = _PyCapsule_GetPointer(capsule, b"dltensor")
    managed = DLManagedTensor.from_address(addr)
    src = managed.dl_tensor
    ndim = src.ndim
    shape = [src.shape[i] for i in range(ndim)]
    strides = [src.strides[i] for i in range(ndim)] if src.strides else None
    if src.dtype.lanes != 1:
        raise TypeError("libmoe: %s: vector dtypes (lanes=%d) are not supported" % (name, src.dtype.lanes))
    code, bits = _reinterpret(src.dtype.code, src.dtype.bits, dtype, name)
    fw = "cupy" if _is_cupy(obj) else "dlpack"
    return Tensor(obj, name, src.data or 0, shape, strides, code, bits,
                  src.device.device_type, src.device.device_id, fw,
                  keep=[capsule], byte_offset=src.byte_offset)


def as_tensor(obj: Any, name: str, dtype: Optional[str] = None,
              stream: Optional[int] = None, output: bool = False) -> Tensor:
    """Borrow `obj` as a DLTensor. dtype="bf16" reads uint16 arrays as bf16
    (dtype="e4m3": uint8 as E4M3FN); other dtypes are left alone."""
    if isinstance(obj, Tensor):
        return obj
    if _is_torch(obj):
        return _from_torch(obj, name, dtype)
    if isinstance(obj, np.ndarray):
        if output and not obj.flags.writeable:
            raise ValueError("libmoe: %s: the output array is read-only" % name)
        return _from_numpy(obj, name, dtype)
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_cai(obj, name, dtype)
    if hasattr(obj, "__dlpack__"):
        return _from_dlpack(obj, name, dtype, stream)
    if output:
        raise TypeError("libmoe: %s: expected a writable array (NumPy, torch, DLPack or "
                        "CUDA array interface), got %s" % (name, type(obj).__name__))
    if hasattr(obj, "__array_interface__") or isinstance(obj, (list, tuple)):
        return _from_numpy(np.asarray(obj), name, dtype)
    raise TypeError("libmoe: %s: expected an array (NumPy, torch, DLPack or CUDA array "
                    "interface), got %s" % (name, type(obj).__name__))


# ---------------------------------------------------------------------------
# Allocation in the caller's framework, streams
# ---------------------------------------------------------------------------

_NP_OF = {"int32": np.int32, "float32": np.float32}
_TORCH_OF = {"int32": "int32", "float32": "float32", "uint8": "uint8"}


def empty_like_framework(ref: Tensor, shape: Sequence[int], dtype: str) -> Any:
    """A new array of `shape` in `ref`'s framework and on its device. dtype is
    "int32", "float32", "uint8" or "same" (ref's own dtype)."""
    shape = tuple(int(s) for s in shape)
    if ref.framework == "torch":
        import torch

        dt = ref.obj.dtype if dtype == "same" else getattr(torch, _TORCH_OF[dtype])
        return torch.empty(shape, dtype=dt, device=ref.obj.device)
    if ref.framework == "cupy":
        import cupy

        with cupy.cuda.Device(ref.device_id):
            if dtype == "same":
                return cupy.empty(shape, dtype=ref.obj.dtype)
            return cupy.empty(shape, dtype=np.dtype(dtype))
    if ref.device_type == kDLCPU:
        if dtype != "same":
            return np.empty(shape, dtype=np.dtype(dtype))
        if ref.framework == "numpy":
            return np.empty(shape, dtype=ref.obj.dtype)
        return np.empty(shape, dtype=_numpy_dtype_of(ref))
    raise TypeError("libmoe: cannot allocate an output next to %s (a %s array on device "
                    "type %d); pass the output array explicitly"
                    % (ref.name, type(ref.obj).__name__, ref.device_type))


def _numpy_dtype_of(ref: Tensor) -> np.dtype:
    if ref.code == kDLBfloat:
        return np.dtype(np.uint16)  # bf16 bits
    if ref.code == kDLFloat8_e4m3fn:
        return np.dtype(np.uint8)
    kinds = {kDLFloat: "f", kDLInt: "i", kDLUInt: "u"}
    return np.dtype("%s%d" % (kinds[ref.code], ref.bits // 8))


def stream_handle(stream: Any) -> Optional[int]:
    """A cudaStream_t as an int from an int, a torch.cuda.Stream or a CuPy stream."""
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError("libmoe: stream must be an int (cudaStream_t), a torch.cuda.Stream or a "
                    "CuPy stream, got %s" % type(stream).__name__)


def current_stream(ref: Tensor) -> Optional[int]:
    """The stream work on `ref` should be ordered on: the framework's current
    stream for CUDA tensors, None for CPU tensors."""
    if not ref.is_cuda:
        return None
    if ref.framework == "torch":
        import torch

        return int(torch.cuda.current_stream(ref.obj.device).cuda_stream)
    if ref.framework == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    if ref.stream_hint is not None:
        return int(ref.stream_hint)
    return 0  # the legacy default stream

