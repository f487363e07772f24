"""Data shipped with rayq: node profiles (``clusters/*.yaml``) and Tune search spaces (``tune_spaces/*.yaml``).

In a source checkout they live at the top of the repository; an installed wheel carries them as the
subpackages ``rayq.resources.clusters`` and ``rayq.resources.tune_spaces``. :func:`find` looks in both.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root when running from a source checkout (``clusters/`` and ``tune_spaces/`` beside ``rayq/``).
_CHECKOUT = Path(__file__).resolve().parents[2]


def directory(kind: str) -> Path | None:
    """The directory holding ``kind`` (``clusters`` or ``tune_spaces``) files, or None if there is none."""
    if kind not in ("clusters", "tune_spaces"):
        raise ValueError(f"resource kind {kind!r} is unknown; choose one of: clusters, tune_spaces")
    installed = Path(__file__).resolve().parent / kind
    if installed.is_dir():
        return installed
    source = _CHECKOUT / kind
    return source if source.is_dir() else None


def find(kind: str, name: str, suffix: str = ".yaml") -> Path | None:
    """The file ``<name><suffix>`` among the ``kind`` resources, or None."""
    d = directory(kind)
    if d is None:
        return None
    path = d / f"{name}{suffix}"
    return path if path.is_file() else None


def names(kind: str, suffix: str = ".yaml") -> list[str]:
    """The names of the ``kind`` resources (file stems), sorted."""
    d = directory(kind)
    return sorted(p.stem for p in d.glob(f"*{suffix}")) if d is not None else []
