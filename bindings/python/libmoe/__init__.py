"""libmoe: the Mixture-of-Experts layer library, from Python (ctypes).

    import libmoe
    with libmoe.Layer.create(w13, w2, method="softmax_topk", num_experts=E, top_k=2) as layer:
        y = layer(hidden, logits)
    with libmoe.Block.create(w13, w2, method="deepseek_v3", num_experts=E, top_k=8,
                             shared_w13=s13, shared_w2=s2, router_options=...) as block:
        y = block(hidden, gate_weight, correction_bias)

Tensors are NumPy arrays, torch tensors, or anything with __dlpack__ or
__cuda_array_interface__; outputs come back in the inputs' framework. The
shared library is found through MOE_LIB_PATH (a file or a directory), next
to this package, in the repo's build/ or build-*/ directories, or on the
system; its major version must equal MOE_EXPECTED_VERSION_MAJOR.
"""

from ._lib import (
    MOE_EXPECTED_VERSION_MAJOR,
    LibraryLoadError,
    LibraryVersionError,
)
from ._core import (
    A2aBufferSizes,
    A2aDispatcher,
    A2aDispatchResult,
    ActScaleMode,
    Activation,
    Block,
    Dispatcher,
    DispatchResult,
    Layer,
    MoeError,
    QuantMode,
    RouteResult,
    Router,
    RoutingMethod,
    Runner,
    SharedExperts,
    Status,
    empty_workspace,
    has_cuda,
    has_nccl,
    HiddenRouteResult,
    library_path,
    pack_topk,
    status_string,
    version,
    version_string,
)
from ._dlpack import DLDataType, DLDevice, DLTensor

__version__ = "0.1.0"

__all__ = [
    "MOE_EXPECTED_VERSION_MAJOR", "LibraryLoadError", "LibraryVersionError",
    "A2aBufferSizes", "A2aDispatcher", "A2aDispatchResult",
    "ActScaleMode", "Activation", "Block", "Dispatcher", "DispatchResult", "HiddenRouteResult", "Layer",
    "MoeError", "QuantMode", "RouteResult", "Router", "RoutingMethod", "Runner", "SharedExperts", "Status",
    "empty_workspace", "has_cuda", "has_nccl", "library_path", "pack_topk", "status_string", "version", "version_string",
    "DLDataType", "DLDevice", "DLTensor",
]
