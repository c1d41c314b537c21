"""The anomaly-detection task, in pure Python (no I/O, no models, no Ray).

- ``geometry``: box conventions, the model grid, IoU and box matching.
- ``prompt``: the inspection prompt as chat messages, and its variants.
- ``answer``: the ``<think>…</think><answer>…</answer>`` language: format and parse.
- ``rewards``: named, bounded reward components and their weighted sum (GRPO).
- ``metrics``: the MMR-AD evaluation protocol.
"""
