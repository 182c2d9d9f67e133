"""One error root; each subclass carries the CLI exit code it maps to."""


class HybridError(Exception):
    """Root of every error tvm-hybrid raises on purpose."""

    exit_code = 1


class UsageError(HybridError):
    """Bad usage, or an unreadable or invalid input file (exit 2)."""

    exit_code = 2


class UnsupportedError(HybridError):
    """The model or the target is not supported (exit 3)."""

    exit_code = 3


class ArtifactError(HybridError):
    """The artifact is invalid: manifest, checksum or version (exit 4)."""

    exit_code = 4


class RuntimeFailure(HybridError):
    """Running failed: device missing, cloud unreachable with no fallback (exit 5)."""

    exit_code = 5


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line (or its type name), for a one-line error message."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
