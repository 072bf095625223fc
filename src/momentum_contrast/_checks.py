"""Argument validation shared by the public modules (private).

Every helper raises ``TypeError`` or ``ValueError`` whose message names the
argument, what was expected and what was given. None of them reads tensor
*values*, so none of them synchronises host and device.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Collection
from typing import TypeGuard

import torch

_LARGEST_FLOAT = sys.float_info.max  # a global: torch 2.5's Dynamo cannot read sys's


def check_float_matrix(
    name: str, x: object, dim: int | None = None, whose: str = ""
) -> torch.Tensor:
    """Require a 2-D floating-point tensor, optionally with ``dim`` columns (``whose``:
    where that width comes from, said in the error)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} must have {dim} columns{f' ({whose})' if whose else ''}, "
            f"got shape {tuple(x.shape)}"
        )
    return x


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Require ``x.shape == ref.shape``; never broadcast."""
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, "
            f"got {tuple(x.shape)}"
        )


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Require ``x`` to live on the device of ``ref``."""
    if x.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name}, {ref.device}, got {x.device}"
        )


def is_real(value: object) -> TypeGuard[float]:
    """A real number: not a bool, not a tensor (``numbers.Real``, so NumPy scalars too)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value: object) -> float:
    """Require a real Python number (not a tensor, not a bool) and return it as float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """Require a finite real number > 0."""
    v = check_real(name, value)
    # not math.isfinite, which Dynamo cannot trace on a symbolic float, nor v < inf, which
    # its symbolic shapes take as true for every value
    if not 0 < v <= _LARGEST_FLOAT:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v


def check_unit_interval(name: str, value: object) -> float:
    """Require a real number in [0, 1]."""
    v = check_real(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v


def check_bool(name: str, value: object) -> bool:
    """Require a bool: a string such as ``"no"`` or a number is not taken as one."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """Require a Python int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_float_dtype(name: str, dtype: object) -> torch.dtype:
    """Require a floating-point ``torch.dtype`` that arithmetic and indexing support: 16 bits
    or more (float8 types are storage formats: most ops refuse them)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
        raise TypeError(
            f"{name} must be a floating-point torch.dtype (float16, bfloat16, float32 or "
            f"float64), got {dtype!r}"
        )
    return dtype


def is_integer(t: torch.Tensor) -> bool:
    """An integer tensor: not floating, complex or bool."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """Require one of a fixed set of strings."""
    if not isinstance(value, str) or value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {expected}, got {value!r}")
    return value
