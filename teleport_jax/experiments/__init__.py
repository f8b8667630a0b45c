"""Reproductions of the seed experiments (``reproduce`` command).

Each experiment module exposes ``run(config, progress) -> dict`` returning its
section of ``summary.json`` (with a ``"table"`` of rows for the printed results
table) and writing its plots into ``config.out_dir``.
"""
