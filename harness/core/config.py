"""Suites and experiments: frozen dataclasses, TOML on disk, validation that names the field.

A suite file (see ``harness/suites/*.toml``) names a dataset, backbones, seeds, a training recipe,
measurement settings and a list of methods with their targets. :func:`expand` turns it into the
grid of :class:`Experiment` objects (backbone x method x target x seed), each with a stable key
made from a hash of what changes its trained weights (measurement settings never re-train).

One validation path: a suite is checked by :func:`parse_suite` on its raw (TOML-form) table, and command-line
overrides are applied to that table (:func:`apply_overrides`) before the same :func:`parse_suite` runs on the
final configuration, so an override is accepted exactly when the same value in the TOML file would be.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from baselines import get_method, list_methods
from harness.core.data import check_dataset_name, check_loader
from harness.core.models import get_backbone_info, list_backbones

__all__ = [
    "MEMORY_FORMATS",
    "ConfigError",
    "TrainConfig",
    "MeasureConfig",
    "MethodEntry",
    "Suite",
    "Experiment",
    "load_suite",
    "parse_suite",
    "expand",
    "list_suites",
    "apply_overrides",
    "target_label",
]


class ConfigError(ValueError):
    """A bad suite, override or flag; the message names the field and the allowed values."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe shared by every run of a suite."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    sparse_epochs: int = 5
    sparse_lambda: float = 1e-4
    augment: bool = True
    bf16: bool = True  # bf16 autocast on CUDA
    bf16_cpu: bool = False  # bf16 autocast on CPU too (fast where the CPU has AVX512-BF16/AMX)
    channels_last: bool = False
    compile: bool = False


MEMORY_FORMATS = ("contiguous", "channels_last", "auto")
"""Layouts a model is timed in (``auto``: the faster of the first two, measured)."""


@dataclass(frozen=True)
class MeasureConfig:
    latency: bool = True
    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 30
    warmup: int = 5
    memory_format: str = "contiguous"


@dataclass(frozen=True)
class MethodEntry:
    name: str
    targets: tuple[Any, ...] = (None,)
    schedule: str = "oneshot"
    steps: int = 1
    seeds: tuple[int, ...] | None = None  # None: the suite's seeds


@dataclass(frozen=True)
class Suite:
    name: str
    dataset: str
    backbones: tuple[str, ...]
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...] = (0,)
    shortcut: str = "A"
    image_size: int | None = None
    data_dir: str | None = None
    data_loader: str = "auto"  # auto | device | stream: how image folders reach the device (harness.core.data)
    loader_workers: int | None = None  # decoding processes of the streaming loader; None: one per CPU, at most 8
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    keep_models: bool = True
    description: str = ""


@dataclass(frozen=True)
class Experiment:
    """One run: everything that determines its result."""

    suite: str
    dataset: str
    image_size: int | None
    data_dir: str | None
    backbone: str
    shortcut: str | None
    method: str
    target: Any
    schedule: str
    steps: int
    seed: int
    train: TrainConfig
    measure: MeasureConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def config_hash(self) -> str:
        # What changes the trained weights: not where the data is cached, not how the model is measured.
        ident = {k: v for k, v in self.to_dict().items() if k not in ("data_dir", "measure")}
        blob = json.dumps(ident, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def variant(self) -> str:
        """The backbone with its shortcut variant: ``resnet56-A``, or ``vgg16`` where there is none."""
        return f"{self.backbone}-{self.shortcut}" if self.shortcut else self.backbone

    @property
    def key(self) -> str:
        return (f"{self.dataset}/{self.variant}/{self.method}/{target_label(self.target)}/{self.schedule}"
                f"/s{self.seed}-{self.config_hash}")


def target_label(target: Any) -> str:
    """A short, path-safe label for a target knob."""
    if target is None:
        return "-"
    if isinstance(target, (int, float, str)) and not isinstance(target, bool):
        return str(target)
    return json.dumps(target, sort_keys=True, separators=(",", ":"))


# --- validation ---------------------------------------------------------------------------------

SHORTCUTS = ("A", "B")
_SUITE_KEYS = {f.name for f in fields(Suite)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(section: str, cls, raw: dict) -> Any:
    """Build dataclass ``cls`` from ``raw``, checking unknown keys and field types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown field; allowed: {', '.join(sorted(known))}")
    defaults = cls()
    values = {}
    for name, value in raw.items():
        values[name] = _check_type(f"{section}.{name}", getattr(defaults, name), value)
    return cls(**values)


def _check_type(path: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{path}: must be >= 0, got {value}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{path}: must be >= 0, got {value}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in value):
            raise ConfigError(f"{path}: expected a list of positive integers, got {value!r}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _check_backbones(raw: Any) -> list[str]:
    backbones = [raw] if isinstance(raw, str) else raw
    if not isinstance(backbones, list) or not backbones:
        raise ConfigError("backbones: expected a non-empty list of backbone names")
    allowed = list_backbones()
    for b in backbones:
        if b not in allowed:
            raise ConfigError(f"backbones: unknown {b!r}; allowed: {', '.join(allowed)}")
    return backbones


def _check_data(raw: dict) -> dict[str, Any]:
    """The suite's data fields (dataset, shortcut, image size, data folder, loader), checked."""
    dataset = raw["dataset"]
    if not isinstance(dataset, str):
        raise ConfigError(f"dataset: expected a string, got {dataset!r}")
    check_dataset_name(dataset)
    shortcut = raw.get("shortcut", "A")
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"shortcut: {shortcut!r} not allowed; allowed: {', '.join(SHORTCUTS)}")
    image_size = raw.get("image_size")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4):
        raise ConfigError(f"image_size: expected an integer >= 4, got {image_size!r}")
    data_dir = raw.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise ConfigError(f"data_dir: expected a string path, got {data_dir!r}")
    data_loader, loader_workers = raw.get("data_loader", "auto"), raw.get("loader_workers")
    try:
        check_loader(dataset, data_loader, loader_workers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {"dataset": dataset, "shortcut": shortcut, "image_size": image_size, "data_dir": data_dir,
            "data_loader": data_loader, "loader_workers": loader_workers}


def _check_method(where: str, m: Any, registered: list[str]) -> MethodEntry:
    """One ``[[methods]]`` table, checked against the method's own targets and schedules."""

    if not isinstance(m, dict) or "name" not in m:
        raise ConfigError(f"{where}.name: missing; allowed: {', '.join(registered)}")
    extra = sorted(set(m) - {f.name for f in fields(MethodEntry)})
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown field; allowed: name, targets, schedule, steps, seeds")
    method = get_method(m["name"])  # raises naming the registered ones
    targets = m.get("targets", [None])
    if not isinstance(targets, list) or not targets:
        raise ConfigError(f"{where}.targets: expected a non-empty list")
    for t in targets:
        try:
            method.validate_target(t)
        except ValueError as err:
            raise ConfigError(f"{where}.targets ({m['name']}): {err}") from None
    schedule = m.get("schedule", "oneshot")
    if schedule not in method.schedules:  # a subset of baselines.SCHEDULES, the method's answer
        raise ConfigError(f"{where}.schedule: {schedule!r} not allowed for {method.name}; allowed: "
                          f"{', '.join(method.schedules)}")
    steps = m.get("steps", 1 if schedule == "oneshot" else 3)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"{where}.steps: expected an integer >= 1, got {steps!r}")
    seeds = m.get("seeds")
    if seeds is not None:
        seeds = tuple(_check_seeds(f"{where}.seeds", seeds))
    return MethodEntry(method.name, tuple(targets), schedule, steps, seeds)


def parse_suite(raw: dict, *, name: str | None = None) -> Suite:
    """Validate a suite given as a dict (the parsed TOML)."""

    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown suite field; allowed: {', '.join(sorted(_SUITE_KEYS))}")
    for required in ("dataset", "backbones", "methods"):
        if required not in raw:
            raise ConfigError(f"{required}: missing; a suite needs dataset, backbones and methods")
    suite_name = raw.get("name", name)
    if not isinstance(suite_name, str) or not suite_name or "/" in suite_name:
        raise ConfigError(f"name: expected a non-empty string without '/', got {suite_name!r}")
    data = _check_data(raw)
    backbones = _check_backbones(raw["backbones"])
    seeds = _check_seeds("seeds", raw.get("seeds", [0]))
    train = _check_train(_coerce("train", TrainConfig, raw.get("train", {})))
    measure = _check_measure(_coerce("measure", MeasureConfig, raw.get("measure", {})))
    keep_models = raw.get("keep_models", True)
    if not isinstance(keep_models, bool):
        raise ConfigError(f"keep_models: expected true or false, got {keep_models!r}")
    methods_raw = raw["methods"]
    if not isinstance(methods_raw, list) or not methods_raw:
        raise ConfigError("methods: expected a non-empty array of tables ([[methods]])")
    registered = list_methods()
    methods = [_check_method(f"methods[{i}]", m, registered) for i, m in enumerate(methods_raw)]
    return Suite(name=suite_name, backbones=tuple(backbones), methods=tuple(methods), seeds=tuple(seeds),
                 train=train, measure=measure, keep_models=keep_models, description=str(raw.get("description", "")),
                 **data)


def _check_seeds(path: str, seeds: Any) -> list[int]:
    """``seeds`` as given, or ConfigError naming ``path``: a non-empty list of distinct integers."""
    if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: duplicate seed in {seeds!r}")
    return seeds


def _check_train(train: TrainConfig) -> TrainConfig:
    """Ranges of the training recipe (types are checked by :func:`_coerce`)."""
    rules = [
        ("epochs", train.epochs >= 1, "an integer >= 1"),
        ("batch_size", train.batch_size >= 1, "an integer >= 1"),
        ("lr", train.lr > 0, "a number > 0"),
        ("momentum", 0 <= train.momentum < 1, "a number in [0, 1)"),
        ("weight_decay", train.weight_decay < 1, "a number in [0, 1)"),
        ("warmup_epochs", train.warmup_epochs <= train.epochs, f"a number in [0, epochs = {train.epochs}]"),
        ("label_smoothing", train.label_smoothing < 1, "a number in [0, 1)"),
        ("finetune_lr", train.finetune_lr > 0, "a number > 0"),
    ]
    for name, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"train.{name}: {getattr(train, name)!r} not allowed; allowed: {allowed}")
    return train


def _check_measure(measure: MeasureConfig) -> MeasureConfig:
    """Ranges and shapes of the measurement settings."""
    if measure.memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"measure.memory_format: {measure.memory_format!r} not allowed; "
                          f"allowed: {', '.join(MEMORY_FORMATS)}")
    if measure.repeats < 3:
        raise ConfigError(f"measure.repeats: {measure.repeats} not allowed; allowed: an integer >= 3 "
                          "(a median of fewer timings is not a measurement)")
    sizes = measure.batch_sizes
    if not 1 <= len(sizes) <= 2 or sizes[0] != 1:
        raise ConfigError(f"measure.batch_sizes: {list(sizes)} not allowed; allowed: [1] or [1, N] with N >= 1 "
                          "(batch 1, then the throughput batch)")
    return measure


def list_suites() -> list[str]:
    """Names of the suites bundled inside the package."""
    return sorted(p.name[:-5] for p in resources.files("harness.suites").iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML ({err})") from None


def load_suite(name_or_path: str) -> Suite:
    """A bundled suite by name, or a suite TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"suite: no such file {str(path)!r}")
        return parse_suite(_read_toml(path.read_text(), str(path)), name=path.stem)
    if name_or_path not in list_suites():
        raise ConfigError(f"suite: unknown {name_or_path!r}; allowed: {', '.join(list_suites())} or a path to a .toml")
    text = resources.files("harness.suites").joinpath(f"{name_or_path}.toml").read_text()
    return parse_suite(_read_toml(text, name_or_path), name=name_or_path)


def suite_to_raw(suite: Suite) -> dict[str, Any]:
    """The TOML-form table of a suite (what :func:`parse_suite` reads back to the same suite)."""
    raw = dataclasses.asdict(suite)
    raw["methods"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in m.items()} for m in raw["methods"]]
    for key in ("backbones", "seeds"):
        raw[key] = list(raw[key])
    raw["measure"]["batch_sizes"] = list(raw["measure"]["batch_sizes"])
    return {k: v for k, v in raw.items() if v is not None}


def apply_overrides(suite: Suite, overrides: list[str]) -> Suite:
    """Apply ``section.field=value`` overrides (e.g. ``train.epochs=3``) and validate the final suite.

    Each value is read as a TOML value (a bare word is a string) and written into the suite's TOML-form table,
    which :func:`parse_suite` then checks as a whole: an override is rejected exactly when the same value in the
    suite file would be, with the same message.
    """
    raw = suite_to_raw(suite)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value (sections: train, measure)")
        path, text = item.split("=", 1)
        section, _, name = path.partition(".")
        if section not in ("train", "measure") or not name:
            raise ConfigError(f"override {path!r}: allowed sections: train, measure (e.g. train.epochs=3)")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw[section][name] = value
    return parse_suite(raw, name=suite.name)


def expand(suite: Suite) -> list[Experiment]:
    """The grid: backbone x method x target x seed, dense first so its checkpoints exist when needed."""
    grid = []
    for backbone in suite.backbones:
        shortcut = suite.shortcut if get_backbone_info(backbone).shortcut_variants else None
        for entry in suite.methods:
            for target in entry.targets:
                for seed in entry.seeds or suite.seeds:
                    grid.append(Experiment(
                        suite=suite.name, dataset=suite.dataset, image_size=suite.image_size,
                        data_dir=suite.data_dir, backbone=backbone, shortcut=shortcut, method=entry.name,
                        target=target, schedule=entry.schedule, steps=entry.steps, seed=seed,
                        train=suite.train, measure=suite.measure))
    return grid
