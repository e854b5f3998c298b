"""Router, Dispatcher, Runner, Layer, SharedExperts, Block and A2aDispatcher:
Python objects over the C handles."""

from __future__ import annotations

import ctypes
import enum
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _dlpack
from ._dlpack import Tensor, as_tensor, current_stream, empty_like_framework, stream_handle
from ._lib import (A2aConfig, DispatcherConfig, RouterConfig, RunnerConfig, SharedExpertsConfig, has_a2a,
                   load)

lib = load()


# ---------------------------------------------------------------------------
# Enums (values are the ABI: append-only, never renumbered)
# ---------------------------------------------------------------------------


class Status(enum.IntEnum):
    SUCCESS = 0
    INVALID_ARGUMENT = 1
    UNSUPPORTED = 2
    OUT_OF_MEMORY = 3
    CUDA_ERROR = 4
    NCCL_ERROR = 5
    INTERNAL_ERROR = 6
    NOT_AVAILABLE = 7


class RoutingMethod(enum.IntEnum):
    SOFTMAX_TOPK = 0
    TOPK_SOFTMAX = 1
    SIGMOID_TOPK = 2
    DEEPSEEK_V3 = 3
    GROUPED_SOFTMAX = 4
    LLAMA4 = 5


class Activation(enum.IntEnum):
    SILU = 0
    GELU = 1
    GELU_TANH = 2
    RELU2 = 3
    IDENTITY = 4


class QuantMode(enum.IntEnum):
    NONE = 0
    FP8_PER_TENSOR = 1
    FP8_BLOCK_128 = 2


class ActScaleMode(enum.IntEnum):
    DYNAMIC = 0
    STATIC = 1


def _enum(cls: type, value: Union[int, str, enum.IntEnum], what: str) -> int:
    """An enum value from a member, its int value or its name (any case)."""
    if isinstance(value, str):
        try:
            return int(cls[value.upper()])
        except KeyError:
            raise ValueError("libmoe: %s=%r is not one of %s"
                             % (what, value, [m.name.lower() for m in cls])) from None
    return int(value)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class MoeError(RuntimeError):
    """A libmoe call failed. `status` is the moe_status_t (a Status when known),
    `message` the library's moe_last_error() text, `function` the C function."""

    def __init__(self, status: int, message: str, function: str = ""):
        try:
            self.status: Union[Status, int] = Status(status)
            label = self.status.name
        except ValueError:
            self.status = status
            label = "status %d" % status
        self.message = message
        self.function = function
        # The library's message already starts with the function's name.
        super().__init__("%s: %s" % (label, message or function))


def _check(status: int, function: str) -> None:
    if status != 0:
        # moe_last_error() is per thread and valid until the next libmoe call.
        raise MoeError(status, lib.moe_last_error().decode("utf-8", "replace"), function)


def version() -> int:
    """moe_version() of the loaded library: major * 10000 + minor * 100 + patch."""
    return int(lib.moe_version())


def version_string() -> str:
    return lib.moe_version_string().decode()


def has_cuda() -> bool:
    """Whether the loaded library has the CUDA backend."""
    return bool(lib.moe_has_cuda())


def status_string(status: int) -> str:
    return lib.moe_status_string(int(status)).decode()


def library_path() -> str:
    return lib._name


def has_nccl() -> bool:
    """Whether the loaded library has the NCCL all-to-all dispatcher (moe_a2a_*)."""
    return has_a2a(lib)


# ---------------------------------------------------------------------------
# One call's arguments
# ---------------------------------------------------------------------------


class _Call:
    """Converts the tensors of one C call and keeps them alive until it returns."""

    def __init__(self, dtype: Optional[str] = None, stream: Any = None):
        self.dtype = dtype
        self.explicit_stream = stream_handle(stream)
        self.tensors: List[Tensor] = []

    def tensor(self, obj: Any, name: str, output: bool = False) -> Optional[Tensor]:
        if obj is None:
            return None
        t = as_tensor(obj, name, self.dtype, self.explicit_stream, output=output)
        self.tensors.append(t)
        return t

    def output(self, obj: Any, name: str, like: Tensor, shape: Sequence[int], dtype: str) -> Tensor:
        """The caller's output array, or a new one in the framework of `like`."""
        if obj is None:
            obj = empty_like_framework(like, shape, dtype)
        return self.tensor(obj, name, output=True)

    def count(self, value: Any, name: str, like: Tensor) -> Optional[Tensor]:
        """num_valid_tokens: a [1] int32 tensor, or a Python int placed next to `like`."""
        if value is None or not isinstance(value, (int, np.integer)):
            return self.tensor(value, name)
        arr = empty_like_framework(like, (1,), "int32")
        arr[0] = int(value)
        return self.tensor(arr, name)

    def workspace(self, obj: Any) -> Tuple[Optional[int], int]:
        """(pointer, bytes) of a caller workspace (any contiguous array), or (None, 0)."""
        t = self.tensor(obj, "workspace", output=True)
        if t is None:
            return None, 0
        if not t.is_contiguous():
            raise ValueError("libmoe: workspace must be a contiguous array")
        return t.address, t.nbytes

    def stream(self, like: Optional[Tensor]) -> Optional[int]:
        if self.explicit_stream is not None:
            return self.explicit_stream
        return current_stream(like) if like is not None else None


def _ptr(t: Optional[Tensor]):
    return t.ptr if t is not None else None


def _rows(t: Tensor) -> int:
    # The library rejects wrong ranks with a message naming the argument.
    return t.shape[0] if t.shape else 0


def _device(device: Any) -> Tuple[int, int]:
    """(DLDeviceType, id) from "cpu", "cuda", "cuda:1", a torch.device or a tuple."""
    if isinstance(device, tuple):
        return int(device[0]), int(device[1])
    text = str(device)
    kind, _, index = text.partition(":")
    kinds = {"cpu": _dlpack.kDLCPU, "cuda": _dlpack.kDLCUDA}
    if kind not in kinds:
        raise ValueError("libmoe: device=%r: expected 'cpu', 'cuda' or 'cuda:N'" % (device,))
    return kinds[kind], int(index) if index else 0


def empty_workspace(nbytes: int, like: Any = None) -> Any:
    """A workspace of `nbytes` bytes, 256-byte aligned, in the framework and on
    the device of `like` (NumPy on the CPU when None)."""
    nbytes = int(nbytes)
    raw = None
    if like is not None:
        ref = as_tensor(like, "like")
        if ref.framework in ("torch", "cupy"):
            raw = empty_like_framework(ref, (nbytes + 256,), "uint8")
    if raw is None:
        raw = np.empty(nbytes + 256, dtype=np.uint8)
    # Over-allocate and slice: CPU allocators only promise 16 or 64 bytes.
    start = -as_tensor(raw, "workspace").address % 256
    return raw[start:start + nbytes]


# ---------------------------------------------------------------------------
# Handles
# ---------------------------------------------------------------------------


class _Handle:
    """An owned C handle: close() destroys it (idempotent); a context manager."""

    _destroy = ""

    def __init__(self) -> None:
        self._h: Optional[int] = None

    def _create(self, fn: str, config: ctypes.Structure) -> None:
        h = ctypes.c_void_p()
        _check(getattr(lib, fn)(ctypes.byref(config), ctypes.byref(h)), fn)
        self._h = h.value

    @property
    def handle(self) -> int:
        if self._h is None:
            raise ValueError("libmoe: this %s is closed" % type(self).__name__)
        return self._h

    @property
    def closed(self) -> bool:
        return self._h is None

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            _check(getattr(lib, self._destroy)(h), self._destroy)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net only; at interpreter exit the library may already be gone.
        try:
            self.close()
        except Exception:
            pass


def _set_fields(config: ctypes.Structure, **fields: Any) -> None:
    for name, value in fields.items():
        if value is not None:
            setattr(config, name, value)


def _flag(v: Optional[bool]) -> Optional[int]:
    return None if v is None else int(bool(v))


class RouteResult(NamedTuple):
    topk_ids: Any
    topk_weights: Any


class HiddenRouteResult(NamedTuple):
    topk_ids: Any
    topk_weights: Any
    logits: Any  # None unless requested


class Router(_Handle):
    """logits [T, E] -> (topk_ids [T, columns] int32, topk_weights [T, columns] f32).

    Options left as None keep the library's per-method default
    (moe_router_config_default)."""

    _destroy = "moe_router_destroy"

    def __init__(self, method: Union[str, int], num_experts: int, top_k: int, *,
                 n_group: Optional[int] = None, topk_group: Optional[int] = None,
                 renormalize: Optional[bool] = None,
                 routed_scaling_factor: Optional[float] = None,
                 scaling_on_output: Optional[bool] = None,
                 num_fused_shared_experts: Optional[int] = None):
        super().__init__()
        cfg = RouterConfig()
        method = _enum(RoutingMethod, method, "method")
        _check(lib.moe_router_config_default(ctypes.byref(cfg), method), "moe_router_config_default")
        _set_fields(cfg, num_experts=num_experts, top_k=top_k, n_group=n_group,
                    topk_group=topk_group,
                    renormalize=None if renormalize is None else int(bool(renormalize)),
                    routed_scaling_factor=routed_scaling_factor,
                    scaling_on_output=None if scaling_on_output is None else int(bool(scaling_on_output)),
                    num_fused_shared_experts=num_fused_shared_experts)
        self._create("moe_router_create", cfg)
        self.config = cfg
        cols = ctypes.c_int32()
        _check(lib.moe_router_output_columns(self.handle, ctypes.byref(cols)), "moe_router_output_columns")
        self.columns = cols.value

    @property
    def method(self) -> RoutingMethod:
        return RoutingMethod(self.config.method)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def route(self, logits: Any, correction_bias: Any = None, num_valid_tokens: Any = None, *,
              topk_ids: Any = None, topk_weights: Any = None, stream: Any = None,
              dtype: Optional[str] = None) -> RouteResult:
        """Route. Outputs are allocated in the framework of `logits` unless given.
        dtype="bf16" reads uint16 NumPy arrays as bf16."""
        c = _Call(dtype, stream)
        x = c.tensor(logits, "logits")
        shape = (_rows(x), self.columns)
        ids = c.output(topk_ids, "topk_ids", x, shape, "int32")
        w = c.output(topk_weights, "topk_weights", x, shape, "float32")
        st = lib.moe_router_run(self.handle, x.ptr, _ptr(c.tensor(correction_bias, "correction_bias")),
                                _ptr(c.count(num_valid_tokens, "num_valid_tokens", x)),
                                ids.ptr, w.ptr, c.stream(x))
        _check(st, "moe_router_run")
        return RouteResult(ids.obj, w.obj)

    __call__ = route

    def hidden_workspace_size(self, hidden_size: int, max_tokens: int, device: Any = "cpu") -> int:
        """Workspace bytes of route_hidden for up to max_tokens tokens."""
        b = ctypes.c_size_t()
        _check(lib.moe_router_hidden_workspace_size(self.handle, hidden_size, max_tokens,
                                                    _device(device)[0], ctypes.byref(b)),
               "moe_router_hidden_workspace_size")
        return b.value

    def route_hidden(self, hidden: Any, gate_weight: Any, correction_bias: Any = None,
                     num_valid_tokens: Any = None, *, topk_ids: Any = None, topk_weights: Any = None,
                     logits: Any = None, return_logits: bool = False, workspace: Any = None,
                     stream: Any = None, dtype: Optional[str] = None) -> "HiddenRouteResult":
        """Route from hidden states (moe_router_run_hidden): logits = hidden [T, H] .
        gate_weight [E, H]^T in f32, then route. The f32 logits come back when
        `logits` (a [T, E] f32 array) is given or return_logits is true; else None."""
        c = _Call(dtype, stream)
        x = c.tensor(hidden, "hidden")
        wg = c.tensor(gate_weight, "gate_weight")
        shape = (_rows(x), self.columns)
        ids = c.output(topk_ids, "topk_ids", x, shape, "int32")
        w = c.output(topk_weights, "topk_weights", x, shape, "float32")
        z = None
        if logits is not None or return_logits:
            z = c.output(logits, "logits", x, (_rows(x), self.num_experts), "float32")
        ws, ws_bytes = c.workspace(workspace)
        st = lib.moe_router_run_hidden(self.handle, x.ptr, wg.ptr,
                                       _ptr(c.tensor(correction_bias, "correction_bias")),
                                       _ptr(c.count(num_valid_tokens, "num_valid_tokens", x)),
                                       ids.ptr, w.ptr, _ptr(z), ws, ws_bytes, c.stream(x))
        _check(st, "moe_router_run_hidden")
        return HiddenRouteResult(ids.obj, w.obj, z.obj if z is not None else None)


def pack_topk(topk_ids: Any, topk_weights: Any, packed: Any = None, *, stream: Any = None) -> Any:
    """(id << 16) | bf16 bits of the weight, one int32 per slot (FlashInfer format)."""
    c = _Call(None, stream)
    ids = c.tensor(topk_ids, "topk_ids")
    w = c.tensor(topk_weights, "topk_weights")
    out = c.output(packed, "packed", ids, ids.shape, "int32")
    _check(lib.moe_pack_topk(ids.ptr, w.ptr, out.ptr, c.stream(ids)), "moe_pack_topk")
    return out.obj


class DispatchResult(NamedTuple):
    local_ids: Any
    expert_counts: Any
    expert_offsets: Any
    sorted_slots: Any


class Dispatcher(_Handle):
    """Global ids -> local ids + the routing metadata the runner reads."""

    _destroy = "moe_dispatcher_destroy"

    def __init__(self, num_experts: int, *, ep_rank: int = 0, ep_size: int = 1,
                 local_expert_mapping: Optional[Sequence[int]] = None,
                 num_local_experts: Optional[int] = None, device: Any = "cpu"):
        super().__init__()
        cfg = DispatcherConfig()
        _check(lib.moe_dispatcher_config_default(ctypes.byref(cfg)), "moe_dispatcher_config_default")
        dev_type, dev_id = _device(device)
        _set_fields(cfg, num_experts=num_experts, ep_rank=ep_rank, ep_size=ep_size,
                    num_local_experts=num_local_experts, device_type=dev_type, device_id=dev_id)
        mapping = None
        if local_expert_mapping is not None:
            # Copied by moe_dispatcher_create; must live until it returns.
            mapping = np.ascontiguousarray(np.asarray(local_expert_mapping), dtype=np.int32)
            cfg.local_expert_mapping = mapping.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._create("moe_dispatcher_create", cfg)
        del mapping
        cfg.local_expert_mapping = None
        self.config = cfg
        self.device = (dev_type, dev_id)
        n = ctypes.c_int32()
        _check(lib.moe_dispatcher_num_local_experts(self.handle, ctypes.byref(n)),
               "moe_dispatcher_num_local_experts")
        self.num_local_experts = n.value

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def mapping(self) -> Tuple[np.ndarray, np.ndarray]:
        """(global -> local id or -1, expert mask), both int32 [num_experts]."""
        n = self.num_experts
        mapping = np.empty(n, np.int32)
        mask = np.empty(n, np.int32)
        i32p = ctypes.POINTER(ctypes.c_int32)
        _check(lib.moe_dispatcher_get_mapping(self.handle, mapping.ctypes.data_as(i32p),
                                              mask.ctypes.data_as(i32p), n),
               "moe_dispatcher_get_mapping")
        return mapping, mask

    def workspace_size(self, max_tokens: int, columns: int) -> int:
        b = ctypes.c_size_t()
        _check(lib.moe_dispatcher_workspace_size(self.handle, max_tokens, columns, ctypes.byref(b)),
               "moe_dispatcher_workspace_size")
        return b.value

    def dispatch(self, topk_ids: Any, *, local_ids: Any = None, expert_counts: Any = None,
                 expert_offsets: Any = None, sorted_slots: Any = None, workspace: Any = None,
                 stream: Any = None) -> DispatchResult:
        c = _Call(None, stream)
        ids = c.tensor(topk_ids, "topk_ids")
        T = _rows(ids)
        K = ids.shape[1] if len(ids.shape) > 1 else 0
        e = self.num_local_experts
        out_local = c.output(local_ids, "local_ids", ids, (T, K), "int32")
        out_counts = c.output(expert_counts, "expert_counts", ids, (e,), "int32")
        out_offsets = c.output(expert_offsets, "expert_offsets", ids, (e + 1,), "int32")
        out_slots = c.output(sorted_slots, "sorted_slots", ids, (T * K,), "int32")
        ws, ws_bytes = c.workspace(workspace)
        st = lib.moe_dispatcher_dispatch(self.handle, ids.ptr, out_local.ptr, out_counts.ptr,
                                         out_offsets.ptr, out_slots.ptr, ws, ws_bytes, c.stream(ids))
        _check(st, "moe_dispatcher_dispatch")
        return DispatchResult(out_local.obj, out_counts.obj, out_offsets.obj, out_slots.obj)

    __call__ = dispatch


class Runner(_Handle):
    """Fused MoE over the local experts. The weights are borrowed: this object
    keeps a reference to the arrays given to set_weights() until replaced."""

    _destroy = "moe_runner_destroy"

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 activation: Union[str, int, None] = None, gated: Optional[bool] = None,
                 swap_gate_up: Optional[bool] = None,
                 apply_router_weight_on_input: Optional[bool] = None,
                 quant_mode: Union[str, int, None] = None,
                 act_scale_mode: Union[str, int, None] = None,
                 output_scale: Optional[float] = None, deterministic: Optional[bool] = None,
                 validate_ids: Optional[bool] = None):
        super().__init__()
        cfg = RunnerConfig()
        _check(lib.moe_runner_config_default(ctypes.byref(cfg)), "moe_runner_config_default")
        flag = lambda v: None if v is None else int(bool(v))  # noqa: E731
        _set_fields(
            cfg, num_experts=num_experts, hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            activation=None if activation is None else _enum(Activation, activation, "activation"),
            gated=flag(gated), swap_gate_up=flag(swap_gate_up),
            apply_router_weight_on_input=flag(apply_router_weight_on_input),
            quant_mode=None if quant_mode is None else _enum(QuantMode, quant_mode, "quant_mode"),
            act_scale_mode=None if act_scale_mode is None else _enum(ActScaleMode, act_scale_mode, "act_scale_mode"),
            output_scale=output_scale, deterministic=flag(deterministic),
            validate_ids=flag(validate_ids))
        self._create("moe_runner_create", cfg)
        self.config = cfg
        self._weights: List[Tensor] = []

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def set_weights(self, w13: Any, w2: Any, w13_scale: Any = None, w2_scale: Any = None,
                    a13_scale: Any = None, a2_scale: Any = None, *, dtype: Optional[str] = None) -> None:
        """Borrow w13 [E, 2I or I, H] and w2 [E, H, I] (and FP8 scales).
        dtype="bf16" reads uint16 NumPy weights as bf16 (dtype="e4m3": uint8 as E4M3FN)."""
        c = _Call(dtype)
        ts = [c.tensor(w13, "w13"), c.tensor(w2, "w2"), c.tensor(w13_scale, "w13_scale"),
              c.tensor(w2_scale, "w2_scale"), c.tensor(a13_scale, "a13_scale"),
              c.tensor(a2_scale, "a2_scale")]
        _check(lib.moe_runner_set_weights(self.handle, *[_ptr(t) for t in ts]), "moe_runner_set_weights")
        self._weights = c.tensors

    def workspace_size(self, max_tokens: int, columns: int, device: Any = "cpu") -> int:
        b = ctypes.c_size_t()
        _check(lib.moe_runner_workspace_size(self.handle, max_tokens, columns, _device(device)[0],
                                             ctypes.byref(b)), "moe_runner_workspace_size")
        return b.value

    def run(self, hidden: Any, local_ids: Any, topk_weights: Any, expert_offsets: Any,
            sorted_slots: Any, *, output: Any = None, workspace: Any = None, stream: Any = None,
            dtype: Optional[str] = None) -> Any:
        """y = MoE(hidden) for dispatched ids; output has hidden's dtype and framework."""
        c = _Call(dtype, stream)
        x = c.tensor(hidden, "hidden")
        ins = [c.tensor(local_ids, "local_ids"), c.tensor(topk_weights, "topk_weights"),
               c.tensor(expert_offsets, "expert_offsets"), c.tensor(sorted_slots, "sorted_slots")]
        y = c.output(output, "output", x, x.shape, "same")
        ws, ws_bytes = c.workspace(workspace)
        st = lib.moe_runner_run(self.handle, x.ptr, *[_ptr(t) for t in ins], y.ptr, ws, ws_bytes,
                                c.stream(x))
        _check(st, "moe_runner_run")
        return y.obj

    __call__ = run


def _close_all(*handles: Any) -> None:
    for h in handles:
        if h is not None:
            h.close()


def _make_routed(w13: Any, w2: Any, method: Union[str, int], num_experts: int, top_k: int,
                 dtype: Optional[str], router_options: Optional[dict],
                 runner_options: Optional[dict]) -> Tuple["Router", "Dispatcher", "Runner"]:
    """A single-rank router, dispatcher and runner (weights set); H and I from
    w2 [E_loc, H, I], the device from w13. Closes what it made on failure."""
    router_options = dict(router_options or {})
    runner_options = dict(runner_options or {})
    t13 = as_tensor(w13, "w13", dtype)
    t2 = as_tensor(w2, "w2", dtype)
    if len(t2.shape) != 3:
        raise ValueError("libmoe: w2 must be [E, H, I], got shape %s" % (t2.shape,))
    e_loc, hidden, inter = t2.shape
    if _enum(RoutingMethod, method, "method") == RoutingMethod.LLAMA4:
        # Llama4's router weight scales the token's input (the library checks the pair).
        runner_options.setdefault("apply_router_weight_on_input", True)
    gated = runner_options.get("gated")
    if gated is None:
        gated = t13.shape[1] == 2 * inter if len(t13.shape) == 3 else True
        runner_options["gated"] = gated
    router = dispatcher = runner = None
    try:
        router = Router(method, num_experts, top_k, **router_options)
        dispatcher = Dispatcher(e_loc, device=(t13.device_type, t13.device_id))
        runner = Runner(e_loc, hidden, inter, **runner_options)
        runner.set_weights(t13, t2, dtype=dtype)
    except BaseException:
        _close_all(runner, dispatcher, router)
        raise
    return router, dispatcher, runner


class _Composite:
    """Lifecycle of an object built over borrowed (or, with owns=True, owned)
    handles: close(), closed, context manager, __del__ as a safety net."""

    _owns = False
    _closed = False

    def _parts(self) -> Tuple[Any, ...]:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("libmoe: this %s is closed" % type(self).__name__)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Idempotent; with owns=True it also closes the handles it was built from."""
        if self._closed:
            return
        self._closed = True
        if self._owns:
            _close_all(*self._parts())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Layer(_Composite):
    """The one-call MoE layer (moe_layer_forward): route -> dispatch -> run.

    Borrows a Router, a Dispatcher and a Runner; with owns=True (as from
    Layer.create) close() closes them too. A context manager."""

    def __init__(self, router: Router, dispatcher: Dispatcher, runner: Runner, *, owns: bool = False):
        self.router, self.dispatcher, self.runner = router, dispatcher, runner
        self._owns = owns
        self._closed = False

    @classmethod
    def create(cls, w13: Any, w2: Any, *, method: Union[str, int], num_experts: int, top_k: int,
               dtype: Optional[str] = None, router_options: Optional[dict] = None,
               runner_options: Optional[dict] = None) -> "Layer":
        """A single-rank layer owning its three handles. H and I come from
        w2 [E_loc, H, I]; the device from w13."""
        router, dispatcher, runner = _make_routed(w13, w2, method, num_experts, top_k, dtype,
                                                  router_options, runner_options)
        return cls(router, dispatcher, runner, owns=True)

    def workspace_size(self, max_tokens: int, device: Any = "cpu") -> int:
        b = ctypes.c_size_t()
        _check(lib.moe_layer_workspace_size(self.router.handle, self.dispatcher.handle,
                                            self.runner.handle, max_tokens, _device(device)[0],
                                            ctypes.byref(b)), "moe_layer_workspace_size")
        return b.value

    def forward(self, hidden: Any, logits: Any, correction_bias: Any = None,
                num_valid_tokens: Any = None, *, output: Any = None, workspace: Any = None,
                stream: Any = None, dtype: Optional[str] = None) -> Any:
        """output [T, H] = MoE(hidden) routed by logits; hidden's dtype and framework."""
        self._check_open()
        c = _Call(dtype, stream)
        x = c.tensor(hidden, "hidden")
        z = c.tensor(logits, "logits")
        bias = c.tensor(correction_bias, "correction_bias")
        valid = c.count(num_valid_tokens, "num_valid_tokens", z)
        y = c.output(output, "output", x, x.shape, "same")
        ws, ws_bytes = c.workspace(workspace)
        st = lib.moe_layer_forward(self.router.handle, self.dispatcher.handle, self.runner.handle,
                                   x.ptr, z.ptr, _ptr(bias), _ptr(valid), y.ptr, ws, ws_bytes,
                                   c.stream(x))
        _check(st, "moe_layer_forward")
        return y.obj

    __call__ = forward

    def _parts(self) -> Tuple[Any, ...]:
        return (self.runner, self.dispatcher, self.router)


# ---------------------------------------------------------------------------
# moe/moe_block.h: shared experts and the one-call block
# ---------------------------------------------------------------------------


class SharedExperts(_Handle):
    """n_shared dense experts every token goes through:
    shared(x) = g(x) * sum_s W2_s . act(W13_s . x), g(x) = sigmoid(x . gate_weight)
    with a gate weight (Qwen2-MoE), else 1. The weights are borrowed: this
    object keeps a reference to the arrays given to set_weights()."""

    _destroy = "moe_shared_experts_destroy"

    def __init__(self, num_shared_experts: int, hidden_size: int, intermediate_size: int, *,
                 activation: Union[str, int, None] = None, gated: Optional[bool] = None,
                 swap_gate_up: Optional[bool] = None):
        super().__init__()
        cfg = SharedExpertsConfig()
        _check(lib.moe_shared_experts_config_default(ctypes.byref(cfg)), "moe_shared_experts_config_default")
        _set_fields(cfg, num_shared_experts=num_shared_experts, hidden_size=hidden_size,
                    intermediate_size=intermediate_size,
                    activation=None if activation is None else _enum(Activation, activation, "activation"),
                    gated=_flag(gated), swap_gate_up=_flag(swap_gate_up))
        self._create("moe_shared_experts_create", cfg)
        self.config = cfg
        self._weights: List[Tensor] = []

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def set_weights(self, w13: Any, w2: Any, gate_weight: Any = None, *, dtype: Optional[str] = None) -> None:
        """Borrow w13 [n, 2I or I, H], w2 [n, H, I] and the optional gate [1, H]."""
        c = _Call(dtype)
        ts = [c.tensor(w13, "w13"), c.tensor(w2, "w2"), c.tensor(gate_weight, "gate_weight")]
        _check(lib.moe_shared_experts_set_weights(self.handle, *[_ptr(t) for t in ts]),
               "moe_shared_experts_set_weights")
        self._weights = c.tensors

    def workspace_size(self, max_tokens: int, device: Any = "cpu") -> int:
        b = ctypes.c_size_t()
        _check(lib.moe_shared_experts_workspace_size(self.handle, max_tokens, _device(device)[0],
                                                     ctypes.byref(b)), "moe_shared_experts_workspace_size")
        return b.value

    def run(self, hidden: Any, num_valid_tokens: Any = None, *, output: Any = None,
            accumulate: bool = False, workspace: Any = None, stream: Any = None,
            dtype: Optional[str] = None) -> Any:
        """output = shared(hidden), or output += shared(hidden) with accumulate=True
        (then `output` must be given)."""
        if accumulate and output is None:
            raise ValueError("libmoe: accumulate=True needs the output array to add to")
        c = _Call(dtype, stream)
        x = c.tensor(hidden, "hidden")
        valid = c.count(num_valid_tokens, "num_valid_tokens", x)
        y = c.output(output, "output", x, x.shape, "same")
        ws, ws_bytes = c.workspace(workspace)
        st = lib.moe_shared_experts_run(self.handle, x.ptr, _ptr(valid), y.ptr, int(bool(accumulate)),
                                        ws, ws_bytes, c.stream(x))
        _check(st, "moe_shared_experts_run")
        return y.obj

    __call__ = run


class Block(_Composite):
    """The complete MoE block (moe_block_forward): gate projection -> route ->
    dispatch -> routed experts -> shared experts -> sum.

    Borrows a Router, a Dispatcher, a Runner and optionally SharedExperts; with
    owns=True (as from Block.create) close() closes them too. A context manager."""

    def __init__(self, router: Router, dispatcher: Dispatcher, runner: Runner,
                 shared: Optional[SharedExperts] = None, *, owns: bool = False):
        self.router, self.dispatcher, self.runner, self.shared = router, dispatcher, runner, shared
        self._owns = owns
        self._closed = False

    @classmethod
    def create(cls, w13: Any, w2: Any, *, method: Union[str, int], num_experts: int, top_k: int,
               shared_w13: Any = None, shared_w2: Any = None, shared_gate_weight: Any = None,
               dtype: Optional[str] = None, router_options: Optional[dict] = None,
               runner_options: Optional[dict] = None, shared_options: Optional[dict] = None) -> "Block":
        """A single-rank block owning its handles. Routed experts as in
        Layer.create; shared experts from shared_w13 [n, 2I_s or I_s, H] and
        shared_w2 [n, H, I_s] (none when omitted), with an optional sigmoid
        gate shared_gate_weight [1, H]."""
        if (shared_w13 is None) != (shared_w2 is None):
            raise ValueError("libmoe: give both shared_w13 and shared_w2, or neither")
        router, dispatcher, runner = _make_routed(w13, w2, method, num_experts, top_k, dtype,
                                                  router_options, runner_options)
        shared = None
        if shared_w13 is not None:
            try:
                s13 = as_tensor(shared_w13, "shared_w13", dtype)
                s2 = as_tensor(shared_w2, "shared_w2", dtype)
                if len(s2.shape) != 3:
                    raise ValueError("libmoe: shared_w2 must be [n, H, I], got shape %s" % (s2.shape,))
                n, hidden, inter = s2.shape
                options = dict(shared_options or {})
                if options.get("gated") is None:
                    options["gated"] = s13.shape[1] == 2 * inter if len(s13.shape) == 3 else True
                shared = SharedExperts(n, hidden, inter, **options)
                shared.set_weights(s13, s2, shared_gate_weight, dtype=dtype)
            except BaseException:
                _close_all(shared, runner, dispatcher, router)
                raise
        return cls(router, dispatcher, runner, shared, owns=True)

    def _shared_handle(self) -> Optional[int]:
        return self.shared.handle if self.shared is not None else None

    def workspace_size(self, max_tokens: int, device: Any = "cpu") -> int:
        self._check_open()
        b = ctypes.c_size_t()
        _check(lib.moe_block_workspace_size(self.router.handle, self.dispatcher.handle, self.runner.handle,
                                            self._shared_handle(), max_tokens, _device(device)[0],
                                            ctypes.byref(b)), "moe_block_workspace_size")
        return b.value

    def forward(self, hidden: Any, gate_weight: Any, correction_bias: Any = None,
                num_valid_tokens: Any = None, *, output: Any = None, workspace: Any = None,
                stream: Any = None, dtype: Optional[str] = None) -> Any:
        """output [T, H] = block(hidden [T, H]) with the gate gate_weight [E, H];
        hidden's dtype and framework. Rows at or past num_valid_tokens are 0."""
        self._check_open()
        c = _Call(dtype, stream)
        x = c.tensor(hidden, "hidden")
        wg = c.tensor(gate_weight, "gate_weight")
        bias = c.tensor(correction_bias, "correction_bias")
        valid = c.count(num_valid_tokens, "num_valid_tokens", x)
        y = c.output(output, "output", x, x.shape, "same")
        ws, ws_bytes = c.workspace(workspace)
        st = lib.moe_block_forward(self.router.handle, self.dispatcher.handle, self.runner.handle,
                                   self._shared_handle(), x.ptr, wg.ptr, _ptr(bias), _ptr(valid), y.ptr,
                                   ws, ws_bytes, c.stream(x))
        _check(st, "moe_block_forward")
        return y.obj

    __call__ = forward

    def _parts(self) -> Tuple[Any, ...]:
        return (self.shared, self.runner, self.dispatcher, self.router)


# ---------------------------------------------------------------------------
# moe/moe_nccl.h: the all-to-all dispatcher (a libmoe built with NCCL only)
# ---------------------------------------------------------------------------

_HIDDEN_DTYPES = {
    "f32": (_dlpack.kDLFloat, 32), "float32": (_dlpack.kDLFloat, 32),
    "f16": (_dlpack.kDLFloat, 16), "float16": (_dlpack.kDLFloat, 16),
    "bf16": (_dlpack.kDLBfloat, 16), "bfloat16": (_dlpack.kDLBfloat, 16),
}


class A2aBufferSizes(NamedTuple):
    recv_rows: int          # R = ep_size * max_tokens_per_rank
    num_local_experts: int  # E_loc of this rank (the runner's num_experts)
    device_bytes: int       # device memory the handle holds


class A2aDispatchResult(NamedTuple):
    recv_hidden: Any     # [R, H]
    recv_local_ids: Any  # [R, k] int32, -1 where the expert lives elsewhere
    recv_weights: Any    # [R, k] f32
    recv_counts: Any     # [ep_size] int32


class A2aDispatcher(_Handle):
    """Expert parallelism over NCCL (moe_a2a_*): dispatch sends each token to
    the ranks holding its experts, combine brings the expert outputs back.

    `comm` is the integer address of this rank's ncclComm_t (a blocking
    communicator on the device the handle uses). The caller creates it and
    keeps it alive until close(): torch.distributed does not expose its NCCL
    communicator, so create one with NCCL directly (ncclCommInitRank, e.g.
    through ctypes on libnccl.so.2; see README.md) and pass its raw pointer. Creation, dispatch and
    combine are collective over the communicator. Raises MoeError with status
    NOT_AVAILABLE when the loaded libmoe was built without NCCL."""

    _destroy = "moe_a2a_destroy"

    def __init__(self, num_experts: int, hidden_size: int, max_tokens_per_rank: int, top_k: int,
                 comm: Optional[int], *, ep_rank: int = 0, ep_size: int = 1,
                 hidden_dtype: str = "bf16", expert_rank: Optional[Sequence[int]] = None,
                 expert_local_id: Optional[Sequence[int]] = None):
        super().__init__()
        if not has_a2a(lib):
            raise MoeError(Status.NOT_AVAILABLE,
                           "moe_a2a_create: the libmoe at %s was built without NCCL (no moe_a2a_* "
                           "functions); build it with CUDA and NCCL (CMake MOE_WITH_NCCL)" % lib._name,
                           "moe_a2a_create")
        if hidden_dtype not in _HIDDEN_DTYPES:
            raise ValueError("libmoe: hidden_dtype=%r: expected one of %s"
                             % (hidden_dtype, sorted(_HIDDEN_DTYPES)))
        cfg = A2aConfig()
        _check(lib.moe_a2a_config_default(ctypes.byref(cfg)), "moe_a2a_config_default")
        code, bits = _HIDDEN_DTYPES[hidden_dtype]
        _set_fields(cfg, num_experts=num_experts, hidden_size=hidden_size,
                    max_tokens_per_rank=max_tokens_per_rank, top_k=top_k, ep_rank=ep_rank, ep_size=ep_size)
        cfg.hidden_dtype = _dlpack.DLDataType(code, bits, 1)
        # Copied by moe_a2a_create; these arrays only need to live until it returns.
        i32p = ctypes.POINTER(ctypes.c_int32)
        maps = [None if m is None else np.ascontiguousarray(np.asarray(m), dtype=np.int32)
                for m in (expert_rank, expert_local_id)]
        if maps[0] is not None:
            cfg.expert_rank = maps[0].ctypes.data_as(i32p)
        if maps[1] is not None:
            cfg.expert_local_id = maps[1].ctypes.data_as(i32p)
        h = ctypes.c_void_p()
        _check(lib.moe_a2a_create(ctypes.byref(cfg), None if comm is None else ctypes.c_void_p(int(comm)),
                                  ctypes.byref(h)), "moe_a2a_create")
        self._h = h.value
        cfg.expert_rank = cfg.expert_local_id = None
        del maps
        self.config = cfg
        rows, n_loc, nbytes = ctypes.c_int64(), ctypes.c_int32(), ctypes.c_size_t()
        _check(lib.moe_a2a_buffer_sizes(self.handle, ctypes.byref(rows), ctypes.byref(n_loc),
                                        ctypes.byref(nbytes)), "moe_a2a_buffer_sizes")
        self.buffer_sizes = A2aBufferSizes(rows.value, n_loc.value, nbytes.value)
        self._tokens: Optional[int] = None

    def mapping(self) -> Tuple[np.ndarray, np.ndarray]:
        """(expert_rank, expert_local_id), both int32 [num_experts]."""
        n = self.config.num_experts
        rank, local = np.empty(n, np.int32), np.empty(n, np.int32)
        i32p = ctypes.POINTER(ctypes.c_int32)
        _check(lib.moe_a2a_get_mapping(self.handle, rank.ctypes.data_as(i32p), local.ctypes.data_as(i32p), n),
               "moe_a2a_get_mapping")
        return rank, local

    def dispatch(self, hidden: Any, topk_ids: Any, topk_weights: Any, *, recv_hidden: Any = None,
                 recv_local_ids: Any = None, recv_weights: Any = None, recv_counts: Any = None,
                 stream: Any = None) -> A2aDispatchResult:
        """Collective. hidden [T, H], topk_ids [T, k] int32 global, topk_weights [T, k] f32;
        the receive buffers are allocated next to hidden unless given."""
        c = _Call(None, stream)
        x = c.tensor(hidden, "hidden")
        ids = c.tensor(topk_ids, "topk_ids")
        w = c.tensor(topk_weights, "topk_weights")
        R, k = self.buffer_sizes.recv_rows, self.config.top_k
        rx = c.output(recv_hidden, "recv_hidden", x, (R, self.config.hidden_size), "same")
        rids = c.output(recv_local_ids, "recv_local_ids", x, (R, k), "int32")
        rw = c.output(recv_weights, "recv_weights", x, (R, k), "float32")
        rc = c.output(recv_counts, "recv_counts", x, (self.config.ep_size,), "int32")
        st = lib.moe_a2a_dispatch(self.handle, x.ptr, ids.ptr, w.ptr, rx.ptr, rids.ptr, rw.ptr, rc.ptr,
                                  c.stream(x))
        _check(st, "moe_a2a_dispatch")
        self._tokens = _rows(x)
        return A2aDispatchResult(rx.obj, rids.obj, rw.obj, rc.obj)

    def combine(self, expert_output: Any, *, output: Any = None, stream: Any = None) -> Any:
        """Collective. expert_output [R, H] -> output [T, H], T of the last dispatch."""
        c = _Call(None, stream)
        x = c.tensor(expert_output, "expert_output")
        if output is None and self._tokens is None:
            raise ValueError("libmoe: combine before any dispatch on this A2aDispatcher")
        y = c.output(output, "output", x, (self._tokens or 0, self.config.hidden_size), "same")
        _check(lib.moe_a2a_combine(self.handle, x.ptr, y.ptr, c.stream(x)), "moe_a2a_combine")
        return y.obj
