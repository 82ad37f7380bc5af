"""Training is deterministic, divergence is caught, checkpoints are verified, the store survives torn rows."""
import json
import math

import pytest
import torch

from harness.core.checkpoints import load_checkpoint, save_checkpoint
from harness.core.config import TrainConfig
from harness.core.data import load_dataset
from harness.core.models import create_backbone
from harness.core.store import ResultStore, load_results
from harness.run.train import TrainingDiverged, evaluate, lr_at, train_model

RECIPE = TrainConfig(epochs=2, batch_size=128, lr=0.1, warmup_epochs=0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


def _train(data, seed):
    torch.manual_seed(seed)
    model = create_backbone("resnet8", num_classes=10, in_channels=1, shortcut="B")
    train_model(model, data, RECIPE, epochs=2, seed=seed)
    return model, evaluate(model, data)


def test_same_seed_same_accuracy(digits8):
    m1, r1 = _train(digits8, 3)
    m2, r2 = _train(digits8, 3)
    _, r3 = _train(digits8, 4)
    assert r1 == r2  # bit-identical on CPU
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert r1["top1"] > 50  # two epochs already learn the digits
    assert r3["test_loss"] != r1["test_loss"]


def test_lr_schedule_shape():
    lrs = [lr_at(s, 100, base_lr=0.1, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_nan_loss_stops_the_run(digits8):
    model = create_backbone("resnet8", num_classes=10, in_channels=1)
    with pytest.raises(TrainingDiverged, match="nan|inf"):
        train_model(model, digits8, RECIPE, epochs=1, regularize=lambda m, loss: loss * float("nan"))


def test_top5_counts(digits8):
    class Fixed(torch.nn.Module):
        def forward(self, x):  # always ranks classes 0 > 1 > ... > 9
            return torch.arange(10, 0, -1, dtype=torch.float32).expand(x.shape[0], 10)

    r = evaluate(Fixed(), digits8)
    y = digits8.y_test
    assert r["top1"] == pytest.approx(100 * (y == 0).float().mean().item())
    assert r["top5"] == pytest.approx(100 * (y < 5).float().mean().item())


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = create_backbone("resnet8", num_classes=10, in_channels=1)
    path = tmp_path / "dense.pt"
    save_checkpoint(path, model, {"epochs": 3})
    state, meta = load_checkpoint(path)
    assert meta["epochs"] == 3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="retrained"):
        assert load_checkpoint(path) is None
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # one flipped bit, same size
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        assert load_checkpoint(path) is None
    assert load_checkpoint(tmp_path / "absent.pt") is None


def test_store_skips_torn_row_and_resumes_on_new_line(tmp_path):
    store = ResultStore(tmp_path / "suite")
    store.append({"key": "a", "status": "failed", "reason": "x", "suite": "s"})
    with open(store.path, "a") as fh:
        fh.write('{"key": "b", "status": "o')  # a writer killed mid-row
    store.append({"key": "a", "status": "ok", "top1": 91.5, "suite": "s"})
    for bad in (float("nan"), None, 100.5, "91"):  # an ok row without a finite top-1 would drop a seed silently
        with pytest.raises(ValueError, match="top1: an ok row needs a finite top-1"):
            store.append({"key": "c", "status": "ok", "top1": bad, "suite": "s"})
    store.append({"key": "c", "status": "failed", "top1": float("nan"), "reason": "diverged", "suite": "s"})
    with pytest.warns(RuntimeWarning, match="torn"):
        assert store.completed_keys() == {"a"}
    with pytest.warns(RuntimeWarning):
        df = load_results(tmp_path / "suite")
    assert sorted(df["key"]) == ["a", "c"]
    assert df.set_index("key").loc["a", "top1"] == 91.5
    assert math.isnan(df.set_index("key").loc["c", "top1"])  # NaN stored as null, read back as missing
    with open(store.path) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 4 and json.loads(lines[2])["key"] == "a"


def test_store_rejects_undocumented_columns(tmp_path):
    with pytest.raises(ValueError, match="unknown column"):
        ResultStore(tmp_path).append({"key": "a", "status": "ok", "accuracy_maybe": 1})


def test_bf16_autocast_on_cpu_is_opt_in_and_deterministic(digits8):
    import dataclasses

    def run(recipe):
        torch.manual_seed(0)
        model = create_backbone("resnet8", num_classes=10, in_channels=1, shortcut="B")
        train_model(model, digits8, recipe, epochs=1, seed=0)
        return model.conv1.weight.detach().clone()

    fp32 = run(RECIPE)  # recipe.bf16 is on, but it applies to CUDA only unless bf16_cpu is set
    bf16 = dataclasses.replace(RECIPE, bf16_cpu=True, channels_last=True)
    a, b = run(bf16), run(bf16)
    assert torch.equal(a, b)  # same seed, same bf16 result
    assert not torch.allclose(a, fp32, atol=1e-6)  # the autocast really changed the arithmetic
    assert torch.isfinite(a).all()
