"""Diagnostics over artifacts: per-token heatmaps (``tokens``, ``terminal``, ``html``), training
curves and eval charts (``plot``), side-by-side eval results (``compare``).

Nothing here imports torch, transformers or matplotlib at module level.
"""
