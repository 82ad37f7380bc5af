"""Analysing a store: metrics against the dense reference, plots and the report."""
