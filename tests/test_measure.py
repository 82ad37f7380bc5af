"""harness.measure: the size columns and the latency protocol (counts themselves: tests/test_counting.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from baselines.counting import count_params, count_params_nonzero
from harness.measure import LATENCY_COLUMNS, checkpoint_bytes, measure_latency, measure_size, measure_speed, peak_memory_mb
from harness.core.devices import device_info
from harness.measure.lowp import GemmConv2d, bf16_columns, mask_2to4, semi24_columns, semi_structured_copy
from harness.core.models import create_backbone
from harness.core.schema import unknown_columns

def test_checkpoint_bytes_grows_by_the_bytes_of_what_it_stores():
    """n float32 weights more cost 4n bytes plus a record overhead under 2 KiB; half precision halves the data."""
    base = checkpoint_bytes(nn.Sequential(nn.Linear(10, 10)))
    for n_in, n_out in [(100, 50), (1000, 300)]:
        n = n_in * n_out + n_out
        grown = checkpoint_bytes(nn.Sequential(nn.Linear(10, 10), nn.Linear(n_in, n_out)))
        assert 4 * n < grown - base < 4 * n + 2048, (n, grown - base)
    model = create_backbone("resnet20")
    state = model.state_dict()  # 116 tensors: weights, BN statistics, num_batches_tracked
    floats = sum(t.numel() for t in state.values() if t.is_floating_point())
    full, half = checkpoint_bytes(model), checkpoint_bytes(copy.deepcopy(model).half())
    assert 4 * floats < full < 4 * floats + 512 * len(state)  # the data plus a few hundred bytes a tensor
    assert abs((full - half) - 2 * floats) <= 64 * len(state)  # half the data; records are 64-byte aligned
    assert model.training and next(model.parameters()).dtype == torch.float32  # the model is not changed


def test_device_info_on_cpu():
    info = device_info("cpu")
    assert isinstance(info["device_name"], str) and info["device_name"]
    assert info["threads"] == torch.get_num_threads()


# --- latency --------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))  # (B, 4, H, W)
        return self.fc(x.mean((2, 3)))  # (B, 2)


def _recording(model: nn.Module) -> list[tuple[int, bool]]:
    """Record (batch, training flag) of each call; the hook survives the deep copy the timer makes."""
    calls: list[tuple[int, bool]] = []
    model.register_forward_hook(lambda m, inputs, out: calls.append((inputs[0].shape[0], m.training)))
    return calls


def test_latency_protocol_on_cpu():
    model = _Tiny().train()
    calls = _recording(model)
    threads_before = torch.get_num_threads()
    row = measure_latency(model, torch.randn(2, 3, 8, 8), batch_sizes=(1, 4), repeats=5, warmup=2, threads=1)
    assert [b for b, _ in calls] == [1] * 7 + [4] * 7  # warm-up + repeats per batch size, no more
    assert not any(training for _, training in calls)  # timed in eval mode
    assert model.training and all(m.training for m in model.modules())  # the caller's model untouched
    assert torch.get_num_threads() == threads_before
    for suffix in ("b1", "bt"):
        p50, p90 = row[f"latency_ms_p50_{suffix}"], row[f"latency_ms_p90_{suffix}"]
        assert 0 < p50 <= p90 and row[f"latency_iqr_ms_{suffix}"] >= 0
    assert row["throughput_batch"] == 4
    assert row["throughput_img_s"] == pytest.approx(4 / (row["latency_ms_p50_bt"] / 1e3))
    assert row["threads"] == 1 and row["latency_device"] == "cpu" and row["dtype"] == "float32"
    assert row["memory_format"] == row["memory_format_requested"] == "contiguous"
    assert row["latency_error"] is None and row["peak_mem_mb"] is None
    assert row["latency_ms_p50_b1_bf16"] is None and row["latency_ms_p50_b1_semi24"] is None
    assert set(row) == set(LATENCY_COLUMNS) and not unknown_columns(row)


def test_auto_memory_format_times_both_layouts():
    model = _Tiny()
    calls = _recording(model)
    row = measure_latency(model, torch.randn(1, 3, 8, 8), batch_sizes=(1, 2), repeats=3, warmup=1,
                          memory_format="auto")
    assert len(calls) == 2 * (4 + 4)
    assert row["memory_format"] in ("contiguous", "channels_last") and row["memory_format_requested"] == "auto"


def test_batch_one_only():
    row = measure_latency(_Tiny(), torch.randn(1, 3, 8, 8), batch_sizes=(1,), repeats=3, warmup=0)
    assert row["latency_ms_p50_b1"] > 0
    assert row["latency_ms_p50_bt"] is None and row["throughput_batch"] is None and row["throughput_img_s"] is None


class _OutOfMemoryAbove(nn.Module):
    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.fc = limit, nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return self.fc(x)  # (B, 2)


def test_out_of_memory_halves_the_throughput_batch():
    row = measure_latency(_OutOfMemoryAbove(2), torch.randn(1, 3), batch_sizes=(1, 8), repeats=3, warmup=1)
    assert row["throughput_batch"] == 2 and row["latency_ms_p50_bt"] > 0 and row["latency_error"] is None


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("broken on purpose")


def test_a_failing_model_gives_an_error_column_not_a_crash():
    row = measure_latency(_Broken(), torch.randn(1, 3), batch_sizes=(1, 4), repeats=3, warmup=0)
    assert "ValueError: broken on purpose" in row["latency_error"]
    assert row["latency_ms_p50_b1"] is None and row["latency_ms_p50_bt"] is None
    assert row["latency_device"] == "cpu"


@pytest.mark.parametrize("kwargs,field", [
    ({"batch_sizes": (4, 8)}, "batch_sizes"),
    ({"repeats": 1}, "repeats"),
    ({"warmup": -1}, "warmup"),
    ({"memory_format": "nhwc"}, "memory_format"),
])
def test_latency_arguments_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=field):
        measure_latency(_Tiny(), torch.randn(1, 3, 8, 8), **kwargs)


def test_peak_memory_is_none_on_cpu():
    assert peak_memory_mb(_Tiny(), torch.randn(1, 3, 8, 8), batch_size=2) is None


def test_size_and_speed_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    with torch.no_grad():
        model[0].weight.add_(torch.sign(model[0].weight) * 1e-3).view(-1)[::2] = 0.0  # half the conv weights zero
        model[3].weight.add_(torch.sign(model[3].weight) * 1e-3)
        model[3].bias.fill_(1.0)
    row = measure_size(model, (4, 8, 8))
    conv, linear, bias = 8 * 4 * 9 * 64, 512 * 10, 10
    assert (row["macs"], row["macs_nonzero"]) == (conv + linear + bias, conv // 2 + linear + bias)
    assert row["params_nonzero"] == 144 + 5120 + 10 and row["ckpt_bytes"] == checkpoint_bytes(model)
    timed = measure_speed(model, torch.randn(2, 4, 8, 8), batch_sizes=(1, 2), repeats=3, warmup=1)
    assert set(LATENCY_COLUMNS) <= set(timed) and timed["latency_ms_p50_b1"] > 0 and not unknown_columns(timed)


# --- 2:4 helpers (the sparse kernels themselves need CUDA) ----------------------------------------


def test_mask_2to4_keeps_the_two_largest_of_each_group():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    masked = mask_2to4(weight)
    groups, kept = weight.view(8, 4, 4), masked.view(8, 4, 4)
    assert ((kept != 0).sum(-1) == 2).all()
    top2 = groups.abs().sort(-1, descending=True).values[..., :2]
    assert torch.equal(kept.abs().sort(-1, descending=True).values[..., :2], top2)
    assert torch.equal(mask_2to4(masked), masked)  # already 2:4: unchanged
    with pytest.raises(ValueError, match="weight2d"):
        mask_2to4(torch.randn(4, 6))


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, True)])
def test_gemm_conv_equals_the_conv(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    gemm = GemmConv2d(conv, conv.weight.detach().reshape(10, -1))
    x = torch.randn(3, 6, 11, 9)
    torch.testing.assert_close(gemm(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not GemmConv2d.supports(nn.Conv2d(4, 4, 3, groups=2))


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu  # skipped without CUDA (conftest)
def test_latency_on_gpu_fills_the_gpu_columns():
    model = create_backbone("resnet20")
    row = measure_latency(model, torch.randn(1, 3, 32, 32), batch_sizes=(1, 32), repeats=5, warmup=2,
                          device="cuda", memory_format="auto")
    assert row["latency_device"].startswith("cuda:") and row["device_name"] == torch.cuda.get_device_name()
    assert 0 < row["latency_ms_p50_b1"] <= row["latency_ms_p90_b1"]
    assert row["latency_ms_p50_b1_bf16"] > 0 and row["latency_ms_p50_bt_bf16"] > 0
    assert row["peak_mem_mb"] > 0
    converted, total = map(int, row["semi24_layers"].split("/"))
    assert total == 20 and (converted == 0 or row["latency_ms_p50_b1_semi24"] > 0), row["latency_error"]
    assert peak_memory_mb(model, torch.randn(1, 3, 32, 32), batch_size=32, device="cuda") > 0


@pytest.mark.gpu  # skipped without CUDA (conftest)
def test_semi_structured_copy_matches_its_dense_reference():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 64))
    net, reference, converted, total, _ = semi_structured_copy(model, device="cuda")
    assert (converted, total) == (3, 3)
    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = reference(x).float(), net(x).float()
    assert (expected - got).abs().max() <= 0.05 * expected.abs().max()
    assert math.isclose(count_params_nonzero(reference.float()) / count_params(reference), 0.5, abs_tol=0.01)


def test_the_gpu_only_columns_plumbing_on_cpu(monkeypatch):
    """The bf16 and semi24 paths run on CPU when the 2:4 conversion is replaced by the identity."""
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net, reference, converted, total, _ = semi_structured_copy(model, device="cpu")
    assert (converted, total) == (3, 4)  # the grouped conv stays dense
    assert isinstance(net[0], GemmConv2d) and isinstance(net[1], nn.Conv2d)
    assert ((reference[0].weight.reshape(8, -1).view(8, -1, 4) != 0).sum(-1) <= 2).all()
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(net(x), reference(x), rtol=0.05, atol=0.05)
    row = dict.fromkeys(LATENCY_COLUMNS)
    common = dict(batch_sizes=(1, 2), repeats=3, warmup=1, device=torch.device("cpu"), memory_format="contiguous")
    assert bf16_columns(model, torch.randn(1, 4, 8, 8), row, common) == []
    assert semi24_columns(model, torch.randn(1, 4, 8, 8), row, common) == []
    assert row["semi24_layers"] == "3/4"
    assert row["latency_ms_p50_b1_bf16"] > 0 and row["latency_ms_p50_bt_semi24"] > 0
