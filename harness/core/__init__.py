"""Foundations every other part of the harness stands on: what a suite says and what a run leaves behind.

- :mod:`harness.core.config`: suite files, overrides, validation, the grid of experiments.
- :mod:`harness.core.data`, :mod:`~harness.core.stream`, :mod:`~harness.core.decode`,
  :mod:`~harness.core.device_loader`: datasets, loaded once, on the device or streamed from disk.
- :mod:`harness.core.models`: dense backbones by name.
- :mod:`harness.core.checkpoints`, :mod:`~harness.core.artefacts`: dense checkpoints and kept models.
- :mod:`harness.core.schema`, :mod:`~harness.core.store`: the row's columns and the result store.
- :mod:`harness.core.devices`: device resolution and names; :mod:`~harness.core.provenance`: git revision,
  versions, host, time stamps.

``core`` imports nothing else of the harness: :mod:`harness.measure` stands on it, :mod:`harness.run` on both,
:mod:`harness.analyse` reads what they write (``tests/test_layers.py`` checks the arrows).
"""
