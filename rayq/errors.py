"""Errors the runtime raises to the launch layer (which turns them into exit codes and messages)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run failed on the workers or peers; the message carries the first failure's own words."""


class NonFiniteGradientError(FloatingPointError):
    """The averaged gradient (or model update) holds NaN or Inf; the message names the worker's bad tensors."""
