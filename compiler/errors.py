"""One exception hierarchy for the whole tool.

Every error a user can cause derives from `NcError`; the CLI catches exactly that
and prints `str(error)`, so no Python traceback ever reaches a user for bad input.
Spec errors carry *all* diagnostics found in a file (like torchtune's config
validation) so a user fixes them in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class NcError(Exception):
    """Base of every user-facing error. `exit_code` is what the CLI returns; `located` errors start
    each line with their own `place: error:` (the CLI prefixes the others with `nccompile: error:`)."""

    exit_code = 2
    located = False


class BudgetError(NcError):
    """A budget of the spec does not hold (predicted before any work, or measured on a written file).
    `failures`: one short line per broken budget (what a study records for a rejected run)."""

    exit_code = 1

    def __init__(self, message: str, failures: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.failures = tuple(failures)


class ExportError(NcError):
    """The model cannot be written as ONNX by nccompile's writer (an op without an ONNX form)."""


class UsageError(NcError):
    """Bad command-line usage (unknown option value, missing file, ...)."""


@dataclass(frozen=True)
class Span:
    """A position in a source file (1-based line and column)."""

    file: str
    line: int
    column: int
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class Diagnostic:
    message: str
    span: Span | None = None
    expected: str | None = None
    hint: str | None = None

    def render(self, sources: dict[str, str]) -> str:
        where = f"{self.span}: " if self.span else ""
        lines = [f"{where}error: {shorten(self.message, 400)}"]
        text = sources.get(self.span.file) if self.span else None
        if text is not None:
            source_lines = text.splitlines()
            if 0 < self.span.line <= len(source_lines):
                src = source_lines[self.span.line - 1].rstrip("\n")
                width = 1
                if self.span.end_column and self.span.end_column > self.span.column:
                    width = self.span.end_column - self.span.column
                # a window of the line around the caret: a source line can be megabytes long
                start = max(0, self.span.column - 60)
                shown = src[start:self.span.column - 1 + min(width, 60) + 60]
                prefix = "..." if start else ""
                lines.append(f"    {prefix}{shown}{'...' if len(src) > start + len(shown) else ''}")
                lines.append("    " + " " * (len(prefix) + self.span.column - 1 - start) + "^" * min(width, 60))
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def shorten(text: str, limit: int) -> str:
    """`text`, its middle cut out past `limit` characters (values echoed in errors can be huge)."""
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text) - limit:,} characters)..." \
        f"{text[-limit // 2:]}"


class FileProblems(NcError):
    """Every problem found in one file (a recipe, a study), each naming its field: `file: error: ...`."""

    located = True

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.source}: error: {p}" for p in self.problems]
        if len(self.problems) > 1:
            lines.append(f"{len(self.problems)} errors")
        return "\n".join(lines)


@dataclass
class SpecError(NcError):
    """One or more problems in a spec file, each with its position."""

    located = True
    diagnostics: list[Diagnostic]
    sources: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [d.render(self.sources) for d in self.diagnostics]
        if len(self.diagnostics) > 1:
            parts.append(f"{len(self.diagnostics)} errors")
        return "\n".join(parts)


class Diagnostics:
    """Collects errors while a pass goes on, then raises them all at once."""

    def __init__(self, sources: dict[str, str] | None = None):
        self.items: list[Diagnostic] = []
        self.sources = sources if sources is not None else {}

    def error(self, message: str, span: Span | None = None, *, expected: str | None = None,
              hint: str | None = None) -> None:
        self.items.append(Diagnostic(message, span, expected, hint))

    def raise_if_any(self) -> None:
        if self.items:
            # In file order, as a reader fixes them; errors without a position last. A block called
            # twice reports an error in its body once.
            unique = list({(d.message, d.span): d for d in self.items}.values())
            ordered = sorted(unique, key=lambda d: (d.span is None, d.span and (d.span.file, d.span.line,
                                                                                   d.span.column)))
            raise SpecError(ordered, self.sources)


def did_you_mean(name: str, candidates) -> str | None:
    """A 'did you mean' hint for the closest known name, or None."""
    import difflib

    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None
