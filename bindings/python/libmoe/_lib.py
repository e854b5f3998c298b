"""Loading libmoe.so and declaring its C functions (ctypes).

Every exported function is declared once below, with its C prototype from
include/moe/moe.h, moe/moe_block.h or moe/moe_nccl.h as a comment over its
argtypes/restype. The moe_a2a_* functions (moe_nccl.h) exist only in a libmoe
built with NCCL: they are declared when the library has them (has_a2a()).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from pathlib import Path
from typing import List, Optional, Sequence

from ._dlpack import DLDataType, DLTensor

# The library major this package speaks to (moe_version() / 10000 must match).
MOE_EXPECTED_VERSION_MAJOR = 0

_PACKAGE_DIR = Path(__file__).resolve().parent
_LIB_GLOB = "libmoe.so*"


class LibraryLoadError(ImportError):
    """libmoe.so was not found or could not be loaded; names every path tried."""


class LibraryVersionError(ImportError):
    """The libmoe.so found has a major version this package does not speak."""


# --------------------------------------------------------------------------
# Config structs (mirrors of include/moe/moe.h; field order is the ABI)
# --------------------------------------------------------------------------


class _Config(ctypes.Structure):
    """A config struct whose struct_size is set at construction, as the
    *_default() functions require."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.struct_size = ctypes.sizeof(self)


class RouterConfig(_Config):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("method", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("n_group", ctypes.c_int32),
        ("topk_group", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("routed_scaling_factor", ctypes.c_float),
        ("scaling_on_output", ctypes.c_int32),
        ("num_fused_shared_experts", ctypes.c_int32),
    ]


class DispatcherConfig(_Config):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("num_experts", ctypes.c_int32),
        ("ep_rank", ctypes.c_int32),
        ("ep_size", ctypes.c_int32),
        ("local_expert_mapping", ctypes.POINTER(ctypes.c_int32)),
        ("num_local_experts", ctypes.c_int32),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
    ]


class RunnerConfig(_Config):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("num_experts", ctypes.c_int32),
        ("hidden_size", ctypes.c_int32),
        ("intermediate_size", ctypes.c_int32),
        ("activation", ctypes.c_int32),
        ("gated", ctypes.c_int32),
        ("swap_gate_up", ctypes.c_int32),
        ("apply_router_weight_on_input", ctypes.c_int32),
        ("quant_mode", ctypes.c_int32),
        ("act_scale_mode", ctypes.c_int32),
        ("output_scale", ctypes.c_float),
        ("deterministic", ctypes.c_int32),
        ("validate_ids", ctypes.c_int32),
    ]


class SharedExpertsConfig(_Config):
    """moe_shared_experts_config_t (moe/moe_block.h)."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("num_shared_experts", ctypes.c_int32),
        ("hidden_size", ctypes.c_int32),
        ("intermediate_size", ctypes.c_int32),
        ("activation", ctypes.c_int32),
        ("gated", ctypes.c_int32),
        ("swap_gate_up", ctypes.c_int32),
    ]


class A2aConfig(_Config):
    """moe_a2a_config_t (moe/moe_nccl.h)."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("num_experts", ctypes.c_int32),
        ("ep_size", ctypes.c_int32),
        ("ep_rank", ctypes.c_int32),
        ("expert_rank", ctypes.POINTER(ctypes.c_int32)),
        ("expert_local_id", ctypes.POINTER(ctypes.c_int32)),
        ("hidden_size", ctypes.c_int32),
        ("hidden_dtype", DLDataType),
        ("max_tokens_per_rank", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
    ]


# --------------------------------------------------------------------------
# Finding the library
# --------------------------------------------------------------------------


def _libs_in_dir(directory: Path) -> List[Path]:
    """libmoe.so* files in a directory, the unversioned name first."""
    # exists() drops dangling symlinks (a build relinking right now).
    found = [Path(p) for p in glob.glob(str(directory / _LIB_GLOB)) if Path(p).exists()]
    return sorted(found, key=lambda p: (p.name != "libmoe.so", len(p.name)))


def _repo_roots() -> List[Path]:
    """Checkouts this package may sit in: above the package, and above the cwd."""
    roots: List[Path] = []
    starts = [_PACKAGE_DIR] + [Path.cwd().resolve()]
    for start in starts:
        for d in [start] + list(start.parents):
            if (d / "include" / "moe" / "moe.h").is_file() and d not in roots:
                roots.append(d)
                break
    return roots


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:  # removed since it was listed
        return 0.0


def _build_dir_candidates() -> List[Path]:
    """libmoe.so* in <repo>/build, then in <repo>/build-*, newest library first."""
    out: List[Path] = []
    for root in _repo_roots():
        canonical = _libs_in_dir(root / "build")[:1]
        # One file per build directory: the others are symlinks to it.
        others = [libs[0] for libs in (_libs_in_dir(Path(d)) for d in glob.glob(str(root / "build-*")))
                  if libs]
        others.sort(key=_mtime, reverse=True)
        out += canonical + others
    return out


def candidate_paths() -> List[str]:
    """Every path the loader tries, in order (without MOE_LIB_PATH)."""
    paths: List[str] = [str(p) for p in _libs_in_dir(_PACKAGE_DIR)[:1]]
    paths += [str(p) for p in _build_dir_candidates()]
    system = ctypes.util.find_library("moe")
    if system:
        paths.append(system)
    soname = "libmoe.so.%d" % MOE_EXPECTED_VERSION_MAJOR
    if soname not in paths:
        paths.append(soname)
    return paths


def _env_candidates(value: str) -> List[str]:
    p = Path(value).expanduser()
    if p.is_dir():
        libs = _libs_in_dir(p)
        return [str(libs[0])] if libs else [str(p / "libmoe.so")]
    return [str(p)]


def find_and_load() -> ctypes.CDLL:
    """Load libmoe: MOE_LIB_PATH (file or dir), else next to the package, the
    repo's build directories, then the system. Raises LibraryLoadError naming
    every path tried and why each failed."""
    env = os.environ.get("MOE_LIB_PATH")
    # An explicit override never falls back to some other libmoe.
    candidates = _env_candidates(env) if env else candidate_paths()
    tried = []
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append("  %s: %s" % (path, e))
    where = "MOE_LIB_PATH=%s" % env if env else "the package directory, build/ and build-*/ of the repo, the system"
    raise LibraryLoadError(
        "libmoe: could not load libmoe.so (searched %s). Tried:\n%s\n"
        "Build it (cmake -S . -B build && cmake --build build) or set MOE_LIB_PATH "
        "to the library file or its directory." % (where, "\n".join(tried))
    )


# --------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------

_status = ctypes.c_int
_handle = ctypes.c_void_p
_handle_p = ctypes.POINTER(ctypes.c_void_p)
_tensor_p = ctypes.POINTER(DLTensor)
_i32_p = ctypes.POINTER(ctypes.c_int32)
_size_p = ctypes.POINTER(ctypes.c_size_t)
_i64_p = ctypes.POINTER(ctypes.c_int64)


def _declare(lib: ctypes.CDLL, name: str, argtypes: Sequence, restype) -> None:
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = restype


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set argtypes/restype of every exported function on `lib`."""
    d = lambda name, args, res=_status: _declare(lib, name, args, res)  # noqa: E731

    # const char* moe_status_string(moe_status_t status);
    d("moe_status_string", [_status], ctypes.c_char_p)
    # const char* moe_last_error(void);
    d("moe_last_error", [], ctypes.c_char_p)
    # uint32_t moe_version(void);
    d("moe_version", [], ctypes.c_uint32)
    # const char* moe_version_string(void);
    d("moe_version_string", [], ctypes.c_char_p)
    # int32_t moe_has_cuda(void);
    d("moe_has_cuda", [], ctypes.c_int32)

    # moe_status_t moe_router_config_default(moe_router_config_t* config, int32_t method);
    d("moe_router_config_default", [ctypes.POINTER(RouterConfig), ctypes.c_int32])
    # moe_status_t moe_router_create(const moe_router_config_t* config, moe_router_t* router);
    d("moe_router_create", [ctypes.POINTER(RouterConfig), _handle_p])
    # moe_status_t moe_router_destroy(moe_router_t router);
    d("moe_router_destroy", [_handle])
    # moe_status_t moe_router_output_columns(moe_router_t router, int32_t* columns);
    d("moe_router_output_columns", [_handle, _i32_p])
    # moe_status_t moe_router_run(moe_router_t router, const DLTensor* logits,
    #     const DLTensor* correction_bias, const DLTensor* num_valid_tokens,
    #     DLTensor* topk_ids, DLTensor* topk_weights, void* stream);
    d("moe_router_run", [_handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, ctypes.c_void_p])
    # moe_status_t moe_pack_topk(const DLTensor* topk_ids, const DLTensor* topk_weights,
    #     DLTensor* packed, void* stream);
    d("moe_pack_topk", [_tensor_p, _tensor_p, _tensor_p, ctypes.c_void_p])

    # moe_status_t moe_dispatcher_config_default(moe_dispatcher_config_t* config);
    d("moe_dispatcher_config_default", [ctypes.POINTER(DispatcherConfig)])
    # moe_status_t moe_dispatcher_create(const moe_dispatcher_config_t* config,
    #     moe_dispatcher_t* dispatcher);
    d("moe_dispatcher_create", [ctypes.POINTER(DispatcherConfig), _handle_p])
    # moe_status_t moe_dispatcher_destroy(moe_dispatcher_t dispatcher);
    d("moe_dispatcher_destroy", [_handle])
    # moe_status_t moe_dispatcher_num_local_experts(moe_dispatcher_t dispatcher,
    #     int32_t* num_local_experts);
    d("moe_dispatcher_num_local_experts", [_handle, _i32_p])
    # moe_status_t moe_dispatcher_get_mapping(moe_dispatcher_t dispatcher, int32_t* mapping,
    #     int32_t* mask, int64_t len);
    d("moe_dispatcher_get_mapping", [_handle, _i32_p, _i32_p, ctypes.c_int64])
    # moe_status_t moe_dispatcher_dispatch(moe_dispatcher_t dispatcher, const DLTensor* topk_ids,
    #     DLTensor* local_ids, DLTensor* expert_counts, DLTensor* expert_offsets,
    #     DLTensor* sorted_slots, void* workspace, size_t workspace_bytes, void* stream);
    d("moe_dispatcher_dispatch", [_handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p,
                                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    # moe_status_t moe_dispatcher_workspace_size(moe_dispatcher_t dispatcher, int64_t max_tokens,
    #     int32_t columns, size_t* bytes);
    d("moe_dispatcher_workspace_size", [_handle, ctypes.c_int64, ctypes.c_int32, _size_p])

    # moe_status_t moe_runner_config_default(moe_runner_config_t* config);
    d("moe_runner_config_default", [ctypes.POINTER(RunnerConfig)])
    # moe_status_t moe_runner_create(const moe_runner_config_t* config, moe_runner_t* runner);
    d("moe_runner_create", [ctypes.POINTER(RunnerConfig), _handle_p])
    # moe_status_t moe_runner_destroy(moe_runner_t runner);
    d("moe_runner_destroy", [_handle])
    # moe_status_t moe_runner_set_weights(moe_runner_t runner, const DLTensor* w13,
    #     const DLTensor* w2, const DLTensor* w13_scale, const DLTensor* w2_scale,
    #     const DLTensor* a13_scale, const DLTensor* a2_scale);
    d("moe_runner_set_weights", [_handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p])
    # moe_status_t moe_runner_workspace_size(moe_runner_t runner, int64_t max_tokens,
    #     int32_t columns, int32_t device_type, size_t* bytes);
    d("moe_runner_workspace_size", [_handle, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, _size_p])
    # moe_status_t moe_runner_run(moe_runner_t runner, const DLTensor* hidden,
    #     const DLTensor* local_ids, const DLTensor* topk_weights,
    #     const DLTensor* expert_offsets, const DLTensor* sorted_slots, DLTensor* output,
    #     void* workspace, size_t workspace_bytes, void* stream);
    d("moe_runner_run", [_handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p,
                         ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])

    # moe_status_t moe_layer_workspace_size(moe_router_t router, moe_dispatcher_t dispatcher,
    #     moe_runner_t runner, int64_t max_tokens, int32_t device_type, size_t* bytes);
    d("moe_layer_workspace_size", [_handle, _handle, _handle, ctypes.c_int64, ctypes.c_int32, _size_p])
    # moe_status_t moe_layer_forward(moe_router_t router, moe_dispatcher_t dispatcher,
    #     moe_runner_t runner, const DLTensor* hidden, const DLTensor* logits,
    #     const DLTensor* correction_bias, const DLTensor* num_valid_tokens, DLTensor* output,
    #     void* workspace, size_t workspace_bytes, void* stream);
    d("moe_layer_forward", [_handle, _handle, _handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p,
                            _tensor_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])

    # --- moe/moe_block.h ---
    # moe_status_t moe_router_hidden_workspace_size(moe_router_t router, int32_t hidden_size,
    #     int64_t max_tokens, int32_t device_type, size_t* bytes);
    d("moe_router_hidden_workspace_size", [_handle, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, _size_p])
    # moe_status_t moe_router_run_hidden(moe_router_t router, const DLTensor* hidden,
    #     const DLTensor* gate_weight, const DLTensor* correction_bias,
    #     const DLTensor* num_valid_tokens, DLTensor* topk_ids, DLTensor* topk_weights,
    #     DLTensor* logits, void* workspace, size_t workspace_bytes, void* stream);
    d("moe_router_run_hidden", [_handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p,
                                _tensor_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    # moe_status_t moe_shared_experts_config_default(moe_shared_experts_config_t* config);
    d("moe_shared_experts_config_default", [ctypes.POINTER(SharedExpertsConfig)])
    # moe_status_t moe_shared_experts_create(const moe_shared_experts_config_t* config,
    #     moe_shared_experts_t* shared);
    d("moe_shared_experts_create", [ctypes.POINTER(SharedExpertsConfig), _handle_p])
    # moe_status_t moe_shared_experts_destroy(moe_shared_experts_t shared);
    d("moe_shared_experts_destroy", [_handle])
    # moe_status_t moe_shared_experts_set_weights(moe_shared_experts_t shared,
    #     const DLTensor* w13, const DLTensor* w2, const DLTensor* gate_weight);
    d("moe_shared_experts_set_weights", [_handle, _tensor_p, _tensor_p, _tensor_p])
    # moe_status_t moe_shared_experts_workspace_size(moe_shared_experts_t shared,
    #     int64_t max_tokens, int32_t device_type, size_t* bytes);
    d("moe_shared_experts_workspace_size", [_handle, ctypes.c_int64, ctypes.c_int32, _size_p])
    # moe_status_t moe_shared_experts_run(moe_shared_experts_t shared, const DLTensor* hidden,
    #     const DLTensor* num_valid_tokens, DLTensor* output, int32_t accumulate,
    #     void* workspace, size_t workspace_bytes, void* stream);
    d("moe_shared_experts_run", [_handle, _tensor_p, _tensor_p, _tensor_p, ctypes.c_int32,
                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    # moe_status_t moe_block_workspace_size(moe_router_t router, moe_dispatcher_t dispatcher,
    #     moe_runner_t runner, moe_shared_experts_t shared, int64_t max_tokens,
    #     int32_t device_type, size_t* bytes);
    d("moe_block_workspace_size", [_handle, _handle, _handle, _handle, ctypes.c_int64, ctypes.c_int32,
                                   _size_p])
    # moe_status_t moe_block_forward(moe_router_t router, moe_dispatcher_t dispatcher,
    #     moe_runner_t runner, moe_shared_experts_t shared, const DLTensor* hidden,
    #     const DLTensor* gate_weight, const DLTensor* correction_bias,
    #     const DLTensor* num_valid_tokens, DLTensor* output, void* workspace,
    #     size_t workspace_bytes, void* stream);
    d("moe_block_forward", [_handle, _handle, _handle, _handle, _tensor_p, _tensor_p, _tensor_p,
                            _tensor_p, _tensor_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])

    # --- moe/moe_nccl.h: only in a libmoe built with NCCL ---
    if has_a2a(lib):
        # moe_status_t moe_a2a_config_default(moe_a2a_config_t* config);
        d("moe_a2a_config_default", [ctypes.POINTER(A2aConfig)])
        # moe_status_t moe_a2a_create(const moe_a2a_config_t* config, void* nccl_comm,
        #     moe_a2a_t* a2a);
        d("moe_a2a_create", [ctypes.POINTER(A2aConfig), ctypes.c_void_p, _handle_p])
        # moe_status_t moe_a2a_destroy(moe_a2a_t a2a);
        d("moe_a2a_destroy", [_handle])
        # moe_status_t moe_a2a_buffer_sizes(moe_a2a_t a2a, int64_t* recv_rows,
        #     int32_t* num_local_experts, size_t* device_bytes);
        d("moe_a2a_buffer_sizes", [_handle, _i64_p, _i32_p, _size_p])
        # moe_status_t moe_a2a_get_mapping(moe_a2a_t a2a, int32_t* expert_rank,
        #     int32_t* expert_local_id, int64_t len);
        d("moe_a2a_get_mapping", [_handle, _i32_p, _i32_p, ctypes.c_int64])
        # moe_status_t moe_a2a_dispatch(moe_a2a_t a2a, const DLTensor* hidden,
        #     const DLTensor* topk_ids, const DLTensor* topk_weights, DLTensor* recv_hidden,
        #     DLTensor* recv_local_ids, DLTensor* recv_weights, DLTensor* recv_counts,
        #     void* stream);
        d("moe_a2a_dispatch", [_handle, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p,
                               _tensor_p, ctypes.c_void_p])
        # moe_status_t moe_a2a_combine(moe_a2a_t a2a, const DLTensor* expert_output,
        #     DLTensor* output, void* stream);
        d("moe_a2a_combine", [_handle, _tensor_p, _tensor_p, ctypes.c_void_p])
    return lib


def has_a2a(lib: ctypes.CDLL) -> bool:
    """Whether `lib` was built with NCCL (exports the moe_a2a_* functions)."""
    return hasattr(lib, "moe_a2a_create")


def check_version(lib, expected_major: Optional[int] = None) -> int:
    """Raise LibraryVersionError unless moe_version()'s major is expected_major
    (default MOE_EXPECTED_VERSION_MAJOR). Returns the version number."""
    if expected_major is None:
        expected_major = MOE_EXPECTED_VERSION_MAJOR
    number = int(lib.moe_version())
    major = number // 10000
    if major != expected_major:
        where = getattr(lib, "_name", "<unknown path>")
        raise LibraryVersionError(
            "libmoe: the library at %s is version %d.%d.%d (moe_version() = %d), "
            "but this Python package needs major version %d. Rebuild the library "
            "or install the matching package, or point MOE_LIB_PATH at the right one."
            % (where, major, number // 100 % 100, number % 100, number, expected_major)
        )
    return number


def load() -> ctypes.CDLL:
    """Find, declare and version-check libmoe."""
    lib = declare(find_and_load())
    check_version(lib)
    return lib
