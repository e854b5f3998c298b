"""Error paths: the library's message names the argument; Python-side misuse
raises a Python error before any C call."""

import numpy as np
import pytest

import libmoe
from libmoe import _dlpack


@pytest.fixture
def layer(rng):
    E, H, I = 8, 32, 48
    w13 = rng.standard_normal((E, 2 * I, H)).astype(np.float32)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32)
    with libmoe.Layer.create(w13, w2, method="softmax_topk", num_experts=E, top_k=2) as layer:
        yield layer


def expect_error(fn, *words, status=libmoe.Status.INVALID_ARGUMENT):
    with pytest.raises(libmoe.MoeError) as e:
        fn()
    assert e.value.status == status
    for w in words:
        assert w in e.value.message, "%r not in %r" % (w, e.value.message)
    assert e.value.message in str(e.value) and status.name in str(e.value)
    return e.value


def test_bad_shapes_name_the_argument(layer, rng):
    x = rng.standard_normal((5, 32)).astype(np.float32)
    z = rng.standard_normal((5, 8)).astype(np.float32)
    expect_error(lambda: layer(x, rng.standard_normal((5, 9)).astype(np.float32)), "logits")
    expect_error(lambda: layer(x, z[:4]), "logits")
    expect_error(lambda: layer(x[:, :31], z), "hidden")
    expect_error(lambda: layer(x, z, output=np.empty((5, 33), np.float32)), "output")
    expect_error(lambda: layer(x.reshape(5, 32, 1), z), "hidden")
    expect_error(lambda: layer(x, z, np.zeros(7, np.float32)), "correction_bias")


def test_wrong_dtypes_name_the_argument(layer, rng):
    x = rng.standard_normal((5, 32)).astype(np.float32)
    z = rng.standard_normal((5, 8)).astype(np.float32)
    expect_error(lambda: layer(x.astype(np.float64), z), "hidden")
    expect_error(lambda: layer(x, z.astype(np.float64)), "logits")
    expect_error(lambda: layer(x, z, output=np.empty((5, 32), np.float16)), "output")
    expect_error(lambda: layer(x, z, num_valid_tokens=np.array([3], np.int64)), "num_valid_tokens")
    # uint16 is bf16 only when the caller says so.
    bits = x.view(np.uint32)[:, ::2].astype(np.uint16)
    expect_error(lambda: layer(bits, z), "hidden")


def test_non_contiguous_input_is_rejected(layer, rng):
    x = rng.standard_normal((5, 64)).astype(np.float32)[:, ::2]
    z = rng.standard_normal((5, 8)).astype(np.float32)
    expect_error(lambda: layer(x, z), "hidden")


def test_router_config_errors_name_the_field():
    expect_error(lambda: libmoe.Router("softmax_topk", 8, 9), "top_k")
    expect_error(lambda: libmoe.Router("deepseek_v3", 10, 2, n_group=4, topk_group=2), "n_group")
    expect_error(lambda: libmoe.Router("deepseek_v3", 16, 2, n_group=4, topk_group=5), "topk_group")
    expect_error(lambda: libmoe.Router(99, 16, 2), "method")


def test_runner_and_dispatcher_errors_name_the_argument(rng):
    expect_error(lambda: libmoe.Runner(4, 0, 16), "hidden_size")
    expect_error(lambda: libmoe.Dispatcher(16, ep_rank=4, ep_size=4), "ep_rank")
    with libmoe.Runner(4, 16, 24) as r:
        w2 = np.zeros((4, 16, 24), np.float32)
        expect_error(lambda: r.set_weights(np.zeros((4, 48, 17), np.float32), w2), "w13")
        expect_error(lambda: r.set_weights(np.zeros((4, 48, 16), np.float32), w2.astype(np.float16)),
                     "w2")
    with libmoe.Dispatcher(16) as d:
        expect_error(lambda: d.dispatch(np.zeros((3, 2), np.int64)), "topk_ids")


def test_python_side_misuse():
    with pytest.raises(ValueError, match="method"):
        libmoe.Router("no_such_method", 8, 2)
    with pytest.raises(ValueError, match="activation"):
        libmoe.Runner(4, 16, 24, activation="swish")
    with pytest.raises(TypeError, match="logits"):
        libmoe.Router("softmax_topk", 8, 2).route(object())
    with pytest.raises(ValueError, match="read-only"):
        out = np.zeros((2, 2), np.int32)
        out.flags.writeable = False
        libmoe.Router("softmax_topk", 8, 2).route(np.zeros((2, 8), np.float32), topk_ids=out)
    with pytest.raises(ValueError, match="device"):
        libmoe.Dispatcher(8, device="tpu")


def test_moe_error_carries_status_and_message():
    e = libmoe.MoeError(1, "logits: expected X, got Y", "moe_router_run")
    assert e.status is libmoe.Status.INVALID_ARGUMENT
    assert e.message == "logits: expected X, got Y" and e.function == "moe_router_run"
    assert isinstance(e, RuntimeError)
    assert libmoe.MoeError(1234, "m").status == 1234  # statuses appended later stay readable
    assert libmoe.status_string(libmoe.Status.INVALID_ARGUMENT)
    assert libmoe.status_string(1234)  # never NULL


def test_cuda_array_interface_is_read_as_a_cuda_tensor():
    # A fake CUDA array: the conversion alone, without touching the memory.
    class FakeCuda:
        __cuda_array_interface__ = {"data": (0xDEAD00, False), "shape": (3, 4), "typestr": "<f2",
                                    "strides": (16, 2), "version": 3, "stream": 7}

    t = _dlpack.as_tensor(FakeCuda(), "x")
    assert t.dl.data == 0xDEAD00 and t.dl.device.device_type == _dlpack.kDLCUDA
    assert t.shape == (3, 4) and t.strides == (8, 1) and t.dtype == "f16"
    assert _dlpack.current_stream(t) == 7
    if not libmoe.has_cuda():
        with libmoe.Router("softmax_topk", 4, 2) as r:
            out = np.zeros((3, 2), np.int32)
            # Mixed devices (or no CUDA backend): rejected before the data is read.
            with pytest.raises(libmoe.MoeError):
                r.route(FakeCuda(), topk_ids=out, topk_weights=np.zeros((3, 2), np.float32))


def test_size_one_dimension_strides_are_normalized():
    x = np.zeros((1, 8), np.float32)
    odd = np.lib.stride_tricks.as_strided(x, shape=(1, 8), strides=(12345 * 4, 4))
    t = _dlpack.as_tensor(odd, "x")
    assert t.strides == (8, 1) and t.is_contiguous()
