"""User-facing errors: each names the file or field and what was expected."""


class M2FError(Exception):
    """Base class for errors shown to the user without a traceback."""


class InputError(M2FError, ValueError):
    """Bad input file / annotation / argument."""


class NonFiniteLossError(M2FError, FloatingPointError):
    """Training produced NaN/Inf."""
