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


def one_line(e: BaseException | str | None, limit: int = 300, last: bool = False, empty: str = "no message") -> str:
    """The first (``last``: the last) non-blank line of an exception's message or of a text (a
    tool's stderr), for a one-line error message. A first line ending in ':' takes the next one
    along ("Error:\n  the reason"); with no text, an exception gives its type name, else ``empty``.
    The one helper for this: every "Error: …" line the tools print is built with it."""
    text = e if isinstance(e, str) else ("" if e is None else str(e))
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return (type(e).__name__ if isinstance(e, BaseException) else empty)[:limit]
    if last:
        return lines[-1][:limit]
    line = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    return line[:limit]
