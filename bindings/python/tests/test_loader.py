"""Loading the library, the version check, the declarations, handle lifetime."""

import ctypes
import gc
import re
from pathlib import Path

import numpy as np
import pytest

import libmoe
from libmoe import _lib

INCLUDE = Path(__file__).resolve().parents[3] / "include" / "moe"
# Every public header: moe.h, moe_block.h, moe_nccl.h (a2a: NCCL builds only).
HEADERS = [INCLUDE / "moe.h", INCLUDE / "moe_block.h", INCLUDE / "moe_nccl.h"]


class FakeLib:
    """Stands in for the CDLL in the version check."""

    _name = "/fake/libmoe.so"

    def __init__(self, number):
        self.moe_version = lambda: number


def test_loaded_version_matches_the_expected_major():
    assert libmoe.version() // 10000 == libmoe.MOE_EXPECTED_VERSION_MAJOR
    major, minor, patch = (int(p) for p in libmoe.version_string().split("."))
    assert libmoe.version() == major * 10000 + minor * 100 + patch


def test_version_mismatch_raises_a_clear_error():
    with pytest.raises(libmoe.LibraryVersionError) as e:
        _lib.check_version(FakeLib(30102), expected_major=0)
    text = str(e.value)
    assert "3.1.2" in text and "major version 0" in text and "/fake/libmoe.so" in text
    assert _lib.check_version(FakeLib(105), expected_major=0) == 105


def test_load_checks_the_expected_major(monkeypatch):
    monkeypatch.setattr(_lib, "MOE_EXPECTED_VERSION_MAJOR", libmoe.MOE_EXPECTED_VERSION_MAJOR + 1)
    monkeypatch.setenv("MOE_LIB_PATH", libmoe.library_path())
    with pytest.raises(libmoe.LibraryVersionError, match="needs major version %d"
                       % (libmoe.MOE_EXPECTED_VERSION_MAJOR + 1)):
        _lib.load()


def test_moe_lib_path_file_and_directory(monkeypatch):
    path = Path(libmoe.library_path())
    for value in (str(path), str(path.parent)):
        monkeypatch.setenv("MOE_LIB_PATH", value)
        lib = _lib.load()
        assert lib.moe_version() == libmoe.version()


def test_missing_library_error_names_every_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_LIB_PATH", str(tmp_path / "nowhere" / "libmoe.so"))
    with pytest.raises(libmoe.LibraryLoadError) as e:
        _lib.find_and_load()
    assert str(tmp_path / "nowhere" / "libmoe.so") in str(e.value)
    assert "MOE_LIB_PATH" in str(e.value)


def test_search_order_without_override(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_LIB_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # only the checkout around the package is searched
    paths = _lib.candidate_paths()
    assert paths[-1] == "libmoe.so.%d" % libmoe.MOE_EXPECTED_VERSION_MAJOR
    repo = Path(_lib.__file__).resolve().parents[3]
    builds = [p for p in paths if Path(p).parent.parent == repo]
    assert all(Path(p).parent.name == "build" or Path(p).parent.name.startswith("build-")
               for p in builds)
    if list(repo.glob("build*/libmoe.so*")):
        assert builds, "a built libmoe in the checkout was not among the candidates"
    # Nothing loadable anywhere: the error lists each candidate with its reason.
    monkeypatch.setattr(_lib, "candidate_paths", lambda: [str(tmp_path / "a.so"), "libnope.so.0"])
    with pytest.raises(libmoe.LibraryLoadError) as e:
        _lib.find_and_load()
    assert str(tmp_path / "a.so") in str(e.value) and "libnope.so.0" in str(e.value)


def _exported_functions():
    text = "".join(h.read_text() for h in HEADERS)
    return sorted(set(re.findall(r"MOE_API\s+[\w\s\*]+?\b(moe_\w+)\s*\(", text)))


@pytest.mark.skipif(not all(h.is_file() for h in HEADERS), reason="not in a libmoe checkout")
def test_every_header_function_is_declared():
    names = _exported_functions()
    assert len(names) > 40
    assert {"moe_block_forward", "moe_shared_experts_run", "moe_a2a_create"} <= set(names)
    lib = libmoe._core.lib
    for name in names:
        if name.startswith("moe_a2a_") and not _lib.has_a2a(lib):
            # A libmoe without NCCL lacks these; the declaration is still checked below.
            assert not hasattr(lib, name), "%s exported but has_a2a() is false" % name
            continue
        fn = getattr(lib, name)
        assert fn.argtypes is not None, "%s has no argtypes" % name
    src = Path(_lib.__file__).read_text()
    for name in names:
        # Declared once, with its C prototype as a comment above.
        assert src.count('d("%s"' % name) == 1, name
        assert re.search(r"#[^\n]*\b%s\(" % name, src), "%s has no prototype comment" % name


@pytest.mark.parametrize("struct,default", [
    (_lib.RouterConfig, lambda c: libmoe._core.lib.moe_router_config_default(ctypes.byref(c), 0)),
    (_lib.DispatcherConfig, lambda c: libmoe._core.lib.moe_dispatcher_config_default(ctypes.byref(c))),
    (_lib.RunnerConfig, lambda c: libmoe._core.lib.moe_runner_config_default(ctypes.byref(c))),
    (_lib.SharedExpertsConfig,
     lambda c: libmoe._core.lib.moe_shared_experts_config_default(ctypes.byref(c))),
    pytest.param(_lib.A2aConfig, lambda c: libmoe._core.lib.moe_a2a_config_default(ctypes.byref(c)),
                 marks=pytest.mark.skipif(not libmoe.has_nccl(), reason="needs a libmoe built with NCCL")),
])
def test_config_mirrors_have_the_library_size(struct, default):
    c = struct()
    assert default(c) == 0
    assert c.struct_size == ctypes.sizeof(struct)


def test_dltensor_mirror_layout():
    # dlpack.h 0.6 on x86-64: data 0, device 8, ndim 16, dtype 20, shape 24, strides 32, offset 40.
    t = libmoe.DLTensor
    offsets = [getattr(t, f).offset for f in ("data", "device", "ndim", "dtype", "shape", "strides",
                                                "byte_offset")]
    assert offsets == [0, 8, 16, 20, 24, 32, 40] and ctypes.sizeof(t) == 48
    assert ctypes.sizeof(libmoe.DLDataType) == 4 and ctypes.sizeof(libmoe.DLDevice) == 8


def test_handles_close_idempotently_and_as_context_managers():
    with libmoe.Router("softmax_topk", 8, 2) as r:
        assert not r.closed and r.handle
    assert r.closed
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r(np.zeros((1, 8), np.float32))
    d = libmoe.Dispatcher(8)
    d.close()
    d.close()
    with pytest.raises(ValueError, match="closed"):
        d.mapping()
    run = libmoe.Runner(8, 16, 32)
    with run:
        pass
    with pytest.raises(ValueError, match="closed"):
        run.set_weights(np.zeros((8, 64, 16), np.float32), np.zeros((8, 16, 32), np.float32))


def test_layer_owning_its_handles_closes_them(rng):
    w13 = rng.standard_normal((4, 32, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 16)).astype(np.float32)
    with libmoe.Layer.create(w13, w2, method="softmax_topk", num_experts=4, top_k=2) as layer:
        parts = (layer.router, layer.dispatcher, layer.runner)
        assert layer.runner.config.gated == 1
    assert layer.closed and all(p.closed for p in parts)
    layer.close()
    with pytest.raises(ValueError, match="closed"):
        layer(np.zeros((1, 8), np.float32), np.zeros((1, 4), np.float32))


def test_unclosed_handles_are_freed_by_the_garbage_collector():
    for _ in range(200):
        libmoe.Router("softmax_topk", 64, 4)
        libmoe.Runner(4, 16, 32)
    gc.collect()


def test_runner_keeps_borrowed_weights_alive(rng):
    E, H, I = 2, 8, 16
    r = libmoe.Runner(E, H, I)
    w13 = rng.standard_normal((E, 2 * I, H)).astype(np.float32)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32)
    r.set_weights(w13.copy(), w2.copy())  # the only references to the copies
    gc.collect()
    ids = np.array([[0, 1]], np.int32)
    with libmoe.Dispatcher(E) as d:
        local, _, offsets, slots = d(ids)
        y = r(np.ones((1, H), np.float32), local, np.ones((1, 2), np.float32), offsets, slots)
    from libmoe import reference as ref
    assert ref.rel_error(y, ref.experts(np.ones((1, H)), ids, np.ones((1, 2)), w13, w2)) < 1e-5
    r.close()
