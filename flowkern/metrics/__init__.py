"""Metrics (L6): diversity and prior preservation of generated samples (``diversity``). The toy's ground-truth
references and distances are research code and live in ``benchmarks/toy/``."""
