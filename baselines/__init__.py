"""Compression methods behind one protocol and one registry (see :mod:`baselines.base`).

Every method module is imported here, explicitly and in a fixed order, so that registration is predictable:
``import baselines`` registers the dense reference, the unstructured and the structured pruning baselines, and
the BUnit adapter.
"""
from baselines.base import (
    FAMILIES,
    SCHEDULES,
    Method,
    MethodContext,
    finetune_split,
    get_method,
    list_methods,
    method_info,
    Pipeline,
    register_method,
)

# method modules, one class each (import order = registration order)
from baselines import dense  # noqa: F401  (dense)
from baselines import global_magnitude, layer_magnitude, random_unstructured, lamp  # noqa: F401  (unstructured)
from baselines import l1_filter, slimming, taylor, depgraph, fpgm, random_channel  # noqa: F401  (structured)

from baselines import bunit_method  # noqa: F401  (bunit)

__all__ = [
    "FAMILIES",
    "SCHEDULES",
    "Method",
    "MethodContext",
    "finetune_split",
    "get_method",
    "list_methods",
    "method_info",
    "Pipeline",
    "register_method",
]
