"""The runtime's errors: the root of mhagen's exception hierarchy lives here, so the standalone
runtime copied into bundles raises the same classes `mhagen` itself does."""

from __future__ import annotations

__all__ = ["MhagenError", "CallError", "MhagenRuntimeError", "BundleError"]


class MhagenError(Exception):
    """Root of every error mhagen raises on purpose."""


class CallError(MhagenError, ValueError):
    """A compiled layer was called with inputs of the wrong shape, dtype or number."""


class MhagenRuntimeError(MhagenError, RuntimeError):
    """The IREE runtime could not load or run a module."""


class BundleError(MhagenError):
    """A bundle directory is missing, corrupt, tampered with, or for another machine."""
