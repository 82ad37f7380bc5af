"""BUnit-Net: compact CNNs from stacked hybrid units (Lan, Cheung et al., TPAMI 2024).

``bunit`` depends on torch only. ``spec`` describes units, ``units`` builds one (and a fused group of them),
``functional`` holds the eager backends' pieces, ``layers`` runs a row of them (reference and fused forms),
``backends`` registers the fused form's execution backends (one file each), ``blocks`` wraps rows as ResNet/VGG
blocks, ``convert`` turns a dense backbone into its BUnit form from a JSON-able plan, and ``autotune`` picks the
fastest backend.
"""
from bunit.autotune import autotune, default_cache_path
from bunit.blocks import BUnitBasicBlock, BUnitBottleneck, BUnitConv
from bunit.convert import PAPER, PRESETS, bunitify, paper_preset, resolve_plan
from bunit.layers import (BACKENDS, EAGER_BACKENDS, IMPLS, UnitLayer, convert_units, set_backend, to_fused,
                          to_reference, unit_layers)
from bunit.units import unit_macs, unit_params
from bunit.spec import CATALOGUE, UnitSpec, compact_specs, hybrid_mix, parse_spec, parse_specs, uniform_units

__all__ = [
    "BACKENDS", "EAGER_BACKENDS", "IMPLS", "CATALOGUE", "PRESETS", "PAPER", "paper_preset",
    "UnitSpec", "parse_spec", "parse_specs", "compact_specs", "hybrid_mix", "uniform_units",
    "UnitLayer", "unit_params", "unit_macs", "to_reference", "to_fused", "convert_units", "set_backend", "unit_layers",
    "BUnitBasicBlock", "BUnitBottleneck", "BUnitConv",
    "bunitify", "resolve_plan",
    "autotune", "default_cache_path",
]
