"""harness.measure: exact counts, the sparse-aware MAC count, and the latency protocol."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

import harness  # noqa: F401 - the torchvision shim before ptflops
from harness.measure import (
    LATENCY_COLUMNS,
    GemmConv2d,
    checkpoint_bytes,
    count_macs,
    count_params,
    count_params_nonzero,
    device_info,
    mask_2to4,
    measure_latency,
    measure_model,
    peak_memory_mb,
    semi_structured_copy,
)
from harness.run.models import VGG16_CFG, create_backbone
from harness.run.schema import unknown_columns

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _flop_counter_macs(model: nn.Module, shape: tuple[int, ...]) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2


def _bias_adds(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Output elements of conv/linear layers with a bias: what ptflops adds and FlopCounterMode leaves out."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output.numel() if module.bias is not None else 0

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


# --- counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,macs", [("resnet20", 269_722, 40_551_050), ("resnet56", 853_018, 125_485_706)])
def test_cifar_resnet_counts_match_the_literature(name, params, macs):
    model = create_backbone(name, num_classes=10, shortcut="A")
    counts = count_macs(model, (3, 32, 32))
    assert count_params(model) == params
    assert counts["macs"] == macs
    assert counts["macs_nonzero"] == macs  # dense weights
    assert counts["macs_all"] > macs  # BN, ReLU, pooling on top


def test_vgg16_counts_match_the_closed_form():
    model = create_backbone("vgg16", num_classes=10)
    macs, params, side, c = 0, 0, 32, 3
    for v in VGG16_CFG:
        if v == "M":
            side //= 2
            continue
        macs += v * c * 9 * side * side
        params += v * c * 9 + 2 * v  # conv weight, BN weight and bias
        c = v
    macs += 512 * 10 + 10  # classifier and its bias adds
    params += 512 * 10 + 10
    assert count_params(model) == params == 14_724_042
    assert count_macs(model, (3, 32, 32))["macs"] == macs == 313_201_674


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_macs_agree_with_torch_flop_counter(name):
    model = create_backbone(name, num_classes=10)
    macs = count_macs(model, (3, 32, 32))["macs"]
    assert _flop_counter_macs(model, (3, 32, 32)) + _bias_adds(model, (3, 32, 32)) == macs
    assert _bias_adds(model, (3, 32, 32)) == 10  # only the classifier has a bias


def test_grouped_and_depthwise_convs_match_the_closed_form():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=True),  # (16, 10, 10)
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),  # (16, 5, 5) depthwise
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 7),
    )
    expected = (16 * (8 // 4) * 9 * 100 + 16 * 100) + 16 * 1 * 9 * 25 + (400 * 7 + 7)
    counts = count_macs(model, (8, 10, 10))
    assert counts["macs"] == counts["macs_nonzero"] == expected == 36_807
    assert _flop_counter_macs(model, (8, 10, 10)) + 16 * 100 + 7 == expected


def _half_zero_(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight.view(-1)[::2] = 0.0


def _conv_linear_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        net[0].weight.add_(torch.sign(net[0].weight) * 1e-3)  # no accidental zeros
        net[3].weight.add_(torch.sign(net[3].weight) * 1e-3)
        net[3].bias.fill_(1.0)
    return net


CONV_MACS, LINEAR_MACS, BIAS_ADDS = 8 * 4 * 9 * 64, 512 * 10, 10


def test_macs_nonzero_halves_with_half_the_weights_zeroed():
    net = _conv_linear_net()
    _half_zero_(net[0].weight)
    _half_zero_(net[3].weight)
    counts = count_macs(net, (4, 8, 8))
    assert counts["macs"] == CONV_MACS + LINEAR_MACS + BIAS_ADDS
    assert counts["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS // 2 + BIAS_ADDS
    assert count_params(net) == 288 + 5120 + 10
    assert count_params_nonzero(net) == 144 + 2560 + 10


def test_macs_nonzero_counts_only_the_zeroed_layer_down():
    net = _conv_linear_net()
    _half_zero_(net[0].weight)
    assert count_macs(net, (4, 8, 8))["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS + BIAS_ADDS


def test_pruning_masks_count_as_zeros():
    net = _conv_linear_net()
    prune.random_unstructured(net[0], "weight", amount=0.5)  # 144 of 288 entries masked
    assert count_params(net) == 288 + 5120 + 10  # weight_orig stays dense
    assert count_params_nonzero(net) == 144 + 5120 + 10
    assert count_macs(net, (4, 8, 8))["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS + BIAS_ADDS


def test_count_macs_leaves_the_model_as_found():
    model = create_backbone("resnet20")
    model.train()
    model.layer2.eval()
    before_flags = [m.training for m in model.modules()]
    before_attrs = [set(vars(m)) for m in model.modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 32, 32))
    assert [m.training for m in model.modules()] == before_flags
    assert [set(vars(m)) for m in model.modules()] == before_attrs
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_count_macs_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(nn.Linear(3, 3), (0, 3))


def test_checkpoint_bytes_is_the_serialized_size():
    model = create_backbone("resnet20")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert checkpoint_bytes(model) == len(buffer.getvalue())
    assert 4 * count_params(model) < checkpoint_bytes(model) < 4 * count_params(model) + 2**20


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


def test_measure_model_combines_every_column():
    model = _conv_linear_net()
    _half_zero_(model[0].weight)
    row = measure_model(model, torch.randn(2, 4, 8, 8), latency=False)
    assert row["macs"] == CONV_MACS + LINEAR_MACS + BIAS_ADDS
    assert row["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS + BIAS_ADDS
    assert row["params_nonzero"] == 144 + 5120 + 10 and row["ckpt_bytes"] == checkpoint_bytes(model)
    assert all(row[c] is None for c in LATENCY_COLUMNS)
    timed = measure_model(model, torch.randn(2, 4, 8, 8), batch_sizes=(1, 2), repeats=3, warmup=1)
    assert timed["latency_ms_p50_b1"] > 0 and not unknown_columns(timed)


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


@pytest.mark.gpu
@gpu
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


@pytest.mark.gpu
@gpu
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
    from harness import measure

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
    assert measure._bf16_columns(model, torch.randn(1, 4, 8, 8), row, common) == []
    assert measure._semi24_columns(model, torch.randn(1, 4, 8, 8), row, common) == []
    assert row["semi24_layers"] == "3/4"
    assert row["latency_ms_p50_b1_bf16"] > 0 and row["latency_ms_p50_bt_semi24"] > 0


@pytest.mark.parametrize("backend", ["loop", "grouped", "grouped_cl", "blockdiag", "bmm"])
def test_bunit_macs_do_not_depend_on_the_execution_backend(backend):
    """A block-diagonal backend runs a dense conv; the count must still be the units' closed form."""
    from bunit import bunitify
    from bunit.layers import set_backend, unit_layers, unit_macs

    from harness.run.models import create_backbone

    dense = create_backbone("resnet20", num_classes=10, in_channels=3, shortcut="A").eval()
    model = bunitify(dense, "cifar-resnet-all").eval()
    reference = count_macs(model, (3, 16, 16))
    set_backend(model, backend)
    counted = count_macs(model, (3, 16, 16))
    assert counted == reference
    assert all(layer.backend == backend for _, layer in unit_layers(model))  # restored afterwards
    # closed form: the dense stem and classifier plus every unit layer's formula
    sizes = {"layer1": 16, "layer2": 8, "layer3": 4}
    units = 0
    for name, layer in unit_layers(model):
        out = sizes[name.split(".")[0]]
        units += unit_macs(layer.specs, out * layer.stride, out * layer.stride)
    stem = 3 * 16 * 9 * 16 * 16
    fc = 64 * 10 + 10  # ptflops aten counts the bias adds of the classifier
    assert reference["macs"] == stem + units + fc


def test_ptflops_default_backend_adds_bn_relu_pooling_on_resnet56():
    """ptflops' default backend (macs_all) on ResNet-56 A at 32x32: 127,623,818 as measured with ptflops 0.7.5."""
    from harness.run.models import create_backbone

    counts = count_macs(create_backbone("resnet56", num_classes=10, in_channels=3, shortcut="A"), (3, 32, 32))
    assert counts["macs"] == 125_485_706
    assert counts["macs_all"] == 127_623_818
