"""libmoe: the Mixture-of-Experts layer library, from Python (ctypes).

    import libmoe
    with libmoe.Layer.create(w13, w2, method="softmax_topk", num_experts=E, top_k=2) as layer:
        y = layer(hidden, logits)

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
    ActScaleMode,
    Activation,
    Dispatcher,
    DispatchResult,
    Layer,
    MoeError,
    QuantMode,
    RouteResult,
    Router,
    RoutingMethod,
    Runner,
    Status,
    empty_workspace,
    has_cuda,
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
    "ActScaleMode", "Activation", "Dispatcher", "DispatchResult", "Layer", "MoeError",
    "QuantMode", "RouteResult", "Router", "RoutingMethod", "Runner", "Status",
    "empty_workspace", "has_cuda", "library_path", "pack_topk", "status_string", "version", "version_string",
    "DLDataType", "DLDevice", "DLTensor",
]
