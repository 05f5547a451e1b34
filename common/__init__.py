"""Small helpers every stage uses: typed configuration, atomic files, local Ray on loopback.

Importing this package also shortens how long torch's idle OpenMP threads spin (GOMP_SPINCOUNT), when torch
is not loaded yet and the variable is not set: every entry point imports it before torch. After each
parallel torch op, libgomp's idle threads spin-wait for the next one; with its default they held the cores
long enough that the Warp kernels' helper threads (optimize3d/hashgrid_warp.py) got none: on 2 cores a
fused reconstruction step took 38.5 ms, and 28.8 ms with 10,000 spins, while the pure-torch step (64 ms)
and the tiny UNet's guidance step (0.069 s) did not change (bench/generate.py). libgomp reads the variable
once, when torch loads it; a value the user set is kept.
"""
import os as _os
import sys as _sys

OPENMP_SPINCOUNT = "10000"
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)
