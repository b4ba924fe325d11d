"""The product layer (L6, beside ``flowkern.cli``): what ``flowkern demo|train|eval|plot`` run.

- ``shapes``: the procedural images the embedded demo model was trained on.
- ``build``: model loading (the shipped tiny model, SD3 directories, FLUX/SiT through their adapters, the 2-D toy),
  rewards (``name[:weight]``, from ``flowkern.rewards.registry``) and methods (``flowkern.methods.registry``) from
  plain settings, and which settings act for which method and model kind (the others are refused).
- ``run``: a training run with logs, progress bars, checkpoints, resume and accelerate (locked run directories).
- ``evaluate``: rewards, diversity and prior preservation on fixed seeds and prompts.
- ``demo``: the ``flowkern demo`` report. ``report``: PNG plots with matplotlib (Agg).
"""
