"""One callable class per pipeline stage: `__init__` loads, `__call__(batch) -> batch`.

Batches are dicts of equal-length lists/arrays (Ray Data's numpy batch format),
so each stage runs the same under Ray Data's map_batches and in a plain loop.
Actors never start Ray.
"""
