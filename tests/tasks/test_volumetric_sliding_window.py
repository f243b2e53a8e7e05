"""Sliding-window inference over volumes: window layout, Gaussian map, output shapes and values."""

from __future__ import annotations

import math

import pytest
import torch

from mamba_dense.tasks.sliding_window3d import gaussian_importance_map, sliding_window_inference_3d, window_starts


def _pointwise(in_ch=2, out_ch=3) -> torch.nn.Conv3d:
    torch.manual_seed(0)
    return torch.nn.Conv3d(in_ch, out_ch, 1).eval()


def test_window_starts_follow_nnunet():
    # nnU-Net: n = ceil((size - patch) / (patch * (1 - overlap))) + 1 windows spread evenly
    assert window_starts(300, 128, 0.5) == [0, 57, 115, 172]
    assert window_starts(512, 128, 0.5) == [0, 64, 128, 192, 256, 320, 384]
    assert window_starts(128, 128, 0.5) == [0] and window_starts(20, 128, 0.5) == [0]
    assert window_starts(100, 32, 0.0) == [0, 23, 45, 68]
    for size, patch, ov in [(37, 16, 0.5), (300, 128, 0.25), (129, 128, 0.5)]:
        s = window_starts(size, patch, ov)
        assert s[0] == 0 and s[-1] == size - patch
        assert max(b - a for a, b in zip(s, s[1:])) <= patch * (1 - ov)


def test_gaussian_importance_map():
    g = gaussian_importance_map((16, 32, 8))
    assert g.shape == (16, 32, 8) and g.dtype == torch.float32
    assert g[8, 16, 4] == 1.0 and g.max() == 1.0 and g.min() > 0
    # sigma = patch / 8 along each axis: one sigma away from the centre the weight is exp(-1/2)
    assert float(g[8 + 2, 16, 4]) == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert float(g[8, 16 + 4, 4]) == pytest.approx(math.exp(-0.5), rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 10, 9), (16, 16, 16), (40, 33, 17), (7, 50, 31)])
@pytest.mark.parametrize("importance", ["gaussian", "constant"])
def test_output_shape_and_values_equal_whole_volume(shape, importance):
    # volumes smaller than, equal to and larger than the patch, non-multiples of it: a pointwise
    # network gives the same values window by window as on the whole volume, wherever the windows are
    net = _pointwise()
    x = torch.randn(2, 2, *shape)
    out = sliding_window_inference_3d(net, x, (16, 16, 16), overlap=0.5, sw_batch_size=3, importance=importance)
    assert out.shape == (2, 3, *shape) and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)


def test_mirroring_and_buffer_device():
    net = _pointwise(1, 2)
    x = torch.randn(1, 1, 20, 24, 18)
    plain = sliding_window_inference_3d(net, x, (16, 16, 16), buffer_device="cpu")
    tta = sliding_window_inference_3d(net, x, (16, 16, 16), mirror_axes=[0, 1, 2], sw_batch_size=8)
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-5)  # flips commute with a pointwise net
    calls = []

    def counting(w):
        calls.append(w.shape[0])
        return net(w)

    sliding_window_inference_3d(counting, x, (16, 16, 16), overlap=0.5, sw_batch_size=4, mirror_axes=[1, 2])
    # windows: D 20 -> 2, H 24 -> 2, W 18 -> 2; 8 windows in 2 calls, each call x 4 flips
    assert calls == [4] * 8


def test_blending_is_gaussian_weighted():
    # a "network" that outputs the window's index: overlaps get the Gaussian-weighted mean,
    # and the centre of each window is dominated by that window
    x = torch.zeros(1, 1, 16, 16, 48)
    counter = iter(range(100))

    def window_id(w):
        return torch.stack([torch.full_like(w[0, :1], float(next(counter))) for _ in range(len(w))])

    out = sliding_window_inference_3d(window_id, x, (16, 16, 16), overlap=0.5)  # W starts 0, 8, 16, 24, 32
    assert out.shape == (1, 1, 16, 16, 48)
    centres = out[0, 0, 8, 8, [8, 16, 24, 32, 40]]
    torch.testing.assert_close(centres, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), atol=0.02, rtol=0)
    assert 0.0 < float(out[0, 0, 8, 8, 12]) < 1.0


def test_bad_arguments():
    x = torch.randn(1, 1, 8, 8, 8)
    net = _pointwise(1, 1)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference_3d(net, x, (8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        sliding_window_inference_3d(net, x[0], (8, 8, 8))
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_inference_3d(net, x, (8, 8, 8), mirror_axes=[3])
    with pytest.raises(ValueError, match="keep the window size"):
        sliding_window_inference_3d(lambda w: w[..., :4], x, (8, 8, 8))


def test_auto_buffer_device_falls_back_to_cpu(monkeypatch):
    from mamba_dense.tasks import sliding_window3d as sw

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    assert sw._resolve_buffer_device("auto", cuda, 2 * 2**30) == cuda  # 2 GiB of logits fit in 10 GiB free
    assert sw._resolve_buffer_device("auto", cuda, 6 * 2**30) == torch.device("cpu")  # over half the free memory
    assert sw._resolve_buffer_device("cpu", cuda, 1) == torch.device("cpu")
    assert sw._resolve_buffer_device("auto", torch.device("cpu"), 10**12) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_network_with_cpu_buffer_and_bf16():
    net = _pointwise(1, 2).cuda()
    x = torch.randn(1, 1, 70, 90, 50, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sliding_window_inference_3d(net, x, (32, 64, 32), sw_batch_size=4, buffer_device="cpu")
        ref = sliding_window_inference_3d(net, x, (32, 64, 32), sw_batch_size=4)
    assert out.device.type == "cpu" and ref.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.cpu(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x).float().cpu(), rtol=2e-2, atol=2e-2)  # bf16 network


def test_importance_map_is_a_fresh_tensor_each_call():
    """The cached map was handed out itself: an in-place edit by a caller changed every later
    sliding-window run in the process."""
    g = gaussian_importance_map((6, 5, 4))
    ref = g.clone()
    g.zero_()
    again = gaussian_importance_map((6, 5, 4))
    assert torch.equal(again, ref) and again.data_ptr() != g.data_ptr()
