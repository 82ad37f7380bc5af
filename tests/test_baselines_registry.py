"""The method registry, the fine-tune rule, schedules, the dense reference and the plugin example."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

from baselines import MethodContext, Pipeline, finetune_split, get_method, list_methods, method_info, register_method
from baselines.base import Method
from baselines.schedule import stage_targets
from harness.core.config import TrainConfig
from harness.core.models import create_backbone

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin_criterion.py"

UNSTRUCTURED = ["global-magnitude", "lamp", "layer-magnitude", "random-unstructured"]
STRUCTURED = ["depgraph", "fpgm", "l1-filter", "random-channel", "slimming", "taylor"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _load_plugin():
    name = "bunitbench_plugin_plugin_criterion"
    if name not in sys.modules:  # import once per process: registering twice raises
        spec = importlib.util.spec_from_file_location(name, PLUGIN)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _built_in(names: list[str]) -> list[str]:
    """The project's own methods among ``names`` (tests/test_contracts.py registers the README's plugin example)."""
    return [n for n in names if method_info(n).__module__.startswith("baselines.")]


def test_every_baseline_is_registered_in_its_family():
    assert _built_in(list_methods(family="unstructured")) == UNSTRUCTURED
    assert _built_in(list_methods(family="structured")) == STRUCTURED
    assert list_methods(family="dense") == ["dense"]
    assert list_methods("*-magnitude") == ["global-magnitude", "layer-magnitude"]
    for name in UNSTRUCTURED + STRUCTURED:
        cls = method_info(name)
        assert cls.name == name and cls().pipeline(TrainConfig()) == Pipeline(start="dense", scratch_epochs=0)
        assert cls.__doc__ and any(str(year) in cls.__doc__ for year in range(2015, 2024)), name  # paper reference


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError) as err:
        get_method("no-such-method")
    message = str(err.value)
    assert message.startswith("method: unknown 'no-such-method'; allowed:")
    for name in UNSTRUCTURED + STRUCTURED + ["dense"]:
        assert name in message


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_method("l1-filter")(type("Again", (Method,), {"family": "structured"}))


def test_dense_returns_the_model_unchanged():
    model = create_backbone("resnet8", shortcut="B")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = MethodContext(example_inputs=torch.randn(2, 3, 8, 8))
    method = get_method("dense")
    assert method.family == "dense" and method.pipeline(TrainConfig()) == Pipeline(start="dense", scratch_epochs=0)
    recipe = TrainConfig(epochs=7, finetune_epochs=3)  # BUnit trains from scratch for the pruning pipeline's budget
    assert get_method("bunit").pipeline(recipe) == Pipeline(start="scratch", scratch_epochs=10)
    assert method.apply(model, None, ctx) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ctx.record == {"epochs_sparse": 0, "epochs_finetune": 0, "epochs_finetune_final": 0}


@pytest.mark.parametrize("schedule, steps, epochs, expected", [
    ("oneshot", 1, 10, (0, 10)),
    ("oneshot", 4, 10, (0, 10)),
    ("iterative", 1, 10, (0, 10)),
    ("iterative", 3, 10, (3, 4)),   # 3 after step 1, 3 after step 2, the harness 4 after step 3
    ("iterative", 4, 2, (0, 2)),    # fewer epochs than steps: all to the harness
])
def test_finetune_split(schedule, steps, epochs, expected):
    ctx = MethodContext(example_inputs=torch.zeros(1), schedule=schedule, steps=steps, finetune_epochs=epochs)
    between, final = finetune_split(ctx)
    assert (between, final) == expected
    steps_between = 0 if schedule == "oneshot" else steps - 1
    assert between * steps_between + final == epochs
    assert ctx.final_finetune_epochs() == epochs  # nothing recorded: all to the harness
    ctx.record["epochs_finetune_final"] = final
    assert ctx.final_finetune_epochs() == final


def test_schedule_errors_name_the_field():
    with pytest.raises(ValueError, match="schedule: 'gradual' not allowed; allowed: oneshot, iterative"):
        finetune_split(MethodContext(example_inputs=torch.zeros(1), schedule="gradual"))
    with pytest.raises(ValueError, match="steps: 0 not allowed"):
        stage_targets(0.5, MethodContext(example_inputs=torch.zeros(1), schedule="iterative", steps=0))


def test_iterative_targets_are_geometric_in_the_kept_fraction():
    ctx = MethodContext(example_inputs=torch.zeros(1), schedule="iterative", steps=3)
    targets = stage_targets(0.875, ctx)
    assert targets == pytest.approx([0.5, 0.75, 0.875])  # keep 1/2, 1/4, 1/8
    assert stage_targets(0.875, MethodContext(example_inputs=torch.zeros(1))) == [0.875]


def test_plugin_criterion_registers_and_prunes_resnet20_option_b():
    module = _load_plugin()
    assert "l2-filter" in list_methods(family="structured")
    assert len(PLUGIN.read_text().splitlines()) < 40
    torch.manual_seed(0)
    model = create_backbone("resnet20", shortcut="B")
    x = torch.randn(4, 3, 16, 16)
    # the criterion on a block-internal group (conv1 out, bn1, conv2 in) is exactly conv1's filter L2 norms
    graph = tp.DependencyGraph().build_dependency(model, x)
    conv = model.layer1[0].conv1
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(16)))
    assert torch.allclose(module.l2_filter_score(group), conv.weight.detach().flatten(1).norm(dim=1))
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    ctx = MethodContext(example_inputs=x)
    pruned = get_method("l2-filter").apply(model, 0.5, ctx)
    assert ctx.record["channel_ratio"] == 0.5
    assert {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)} == \
        {n: c // 2 for n, c in dense.items()}  # local ranking: every layer loses half
    out = pruned(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
