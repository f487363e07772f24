"""Compiled CPU loops for the few hot paths that no sequence of tensor operations expresses well (an
entropy coder's serial state, a fused quantise-and-count pass).

:func:`compiled` wraps a plain function written in numba's subset of Python and NumPy; numba is
imported and the function compiled on its first call only (about a second, once per machine: the
machine code is cached on disk next to the source), so importing rayq stays fast.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def compiled(fn: F) -> F:
    """``fn`` compiled by numba (no Python objects, no GIL held while it runs) on its first call."""
    machine_code = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal machine_code
        if machine_code is None:
            import numba

            machine_code = numba.njit(cache=True, nogil=True, boundscheck=False)(fn)
        return machine_code(*args)

    return call  # type: ignore[return-value]
