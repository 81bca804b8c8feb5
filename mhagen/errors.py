"""The exception hierarchy: every error mhagen raises on purpose derives from `MhagenError`."""

from __future__ import annotations

from .runtime.errors import BundleError, CallError, MhagenError, MhagenRuntimeError

__all__ = [
    "MhagenError",
    "SpecError",
    "WeightsError",
    "TargetError",
    "CompileError",
    "CallError",
    "MhagenRuntimeError",
    "BundleError",
    "VerifyError",
    "invalid",
]


class SpecError(MhagenError, ValueError):
    """A layer or call description is invalid (wrong value, wrong type, unknown key)."""


class WeightsError(MhagenError, ValueError):
    """Weights are missing, extra, or have the wrong shape."""


class TargetError(MhagenError, ValueError):
    """A target is unknown, malformed, or cannot do what was asked of it."""


class CompileError(MhagenError):
    """IREE failed to compile a program.

    Carries the command line, the compiler's diagnostics and how to keep reproducers.
    """

    def __init__(self, message: str, *, command: list[str] | None = None, diagnostics: str = ""):
        self.command = command or []
        self.diagnostics = diagnostics
        hint = "set IREE_SAVE_TEMPS=DIR to keep the compiler's reproducers"
        full = message
        if diagnostics:
            full += "\n" + diagnostics.strip()
        full += f"\n({hint})"
        super().__init__(full)
        self.summary = message


class VerifyError(MhagenError):
    """Compiled outputs disagree with the NumPy oracle."""


def invalid(argument: str, expected: str, received: object, *, cls: type[MhagenError] = SpecError) -> MhagenError:
    """Build the one error message template: the argument, what was expected, what was received.

    >>> str(invalid("num_heads", "a positive integer", 0))
    'Received an invalid value for argument `num_heads`, expected a positive integer. Received: num_heads=0'
    """
    return cls(
        f"Received an invalid value for argument `{argument}`, expected {expected}. "
        f"Received: {argument}={received!r}"
    )
