"""The toy with ground truth (docs/math.md section 10, M36-M41): research code for the benchmarks and tests, not
part of the installed package.

A Gaussian mixture base with its exact rectified-flow velocity (M38, ``flowkern.models.toy``), rewards whose optimum
is known, and the two references a fine-tuned model is held to: p* (M36, ``tilted``) for memoryless adjoint matching
and q* (M37, ``optimal_control``, ``grid_dp``) for deterministic adjoint matching and VGG-Flow. ``distances`` holds
the energy distance and its yardsticks (M40, M41); ``settings`` the chosen problems and their cached references;
``dynamics`` the controlled Euler map the q* solver differentiates through. Sampling on a whole grid and diversity
come from flowkern (``flowkern.sampling``, ``flowkern.metrics.diversity``).

    python -m benchmarks.toy                  # q* vs p* distinguishability of every setting
    python -m benchmarks.toy_alignment        # every method against its reference (benchmarks/results/toy/)
"""

from .distances import (
    discretization_gap,
    energy_distance,
    expected_floor,
    mode_coverage,
    mode_masses,
    noise_floor,
    w2_bound_diagnostic,
)
from .dynamics import controlled_euler
from .grid_dp import GridDP2D
from .optimal_control import aimed_start, model_controls, q_star_samples, solve_optimal_controls
from .settings import (
    TOY_SETTINGS,
    settings_table,
    toy_mixture,
    toy_problem,
    toy_q_star_fine,
    toy_references,
    toy_settings,
)
from .tilted import sample_tilted, tilt_linear

__all__ = [
    "TOY_SETTINGS",
    "GridDP2D",
    "aimed_start",
    "controlled_euler",
    "discretization_gap",
    "energy_distance",
    "expected_floor",
    "mode_coverage",
    "mode_masses",
    "model_controls",
    "noise_floor",
    "q_star_samples",
    "sample_tilted",
    "settings_table",
    "solve_optimal_controls",
    "tilt_linear",
    "toy_mixture",
    "toy_problem",
    "toy_q_star_fine",
    "toy_references",
    "toy_settings",
    "w2_bound_diagnostic",
]
