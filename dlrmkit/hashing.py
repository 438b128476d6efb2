"""Counter-based pseudo-random numbers: a value per key, the same in every process, worker and run.

`splitmix64` is the finaliser of Steele, Lea and Flood's SplitMix64 generator (OOPSLA 2014):
a bijective, well-mixed hash of 64-bit words. `unit_interval` turns hashes into floats in [0, 1).
Used wherever a draw must depend only on a key (a line number, a row position, an id), never on
the order in which keys are visited: preprocessing's sub-sampling, the row permutations of the
Criteo loaders, the fake data generator, the multi-hot expansion, the tables' initial values
(`kernels.uniform_`, whose C kernel computes the same words).
"""

from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio, odd


def splitmix64(x):
    """A well-mixed 64-bit hash of each uint64 (SplitMix64 finaliser of x + gamma); vectorised, wraps mod 2^64."""
    z = x + GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unit_interval(hashes) -> np.ndarray:
    """float64 in [0, 1) from uint64 hashes: their top 53 bits times 2^-53 (every value a multiple of 2^-53)."""
    return (np.asarray(hashes, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
