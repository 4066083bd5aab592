"""The CLI's rich pieces, imported when first used: `out` (the console), `Console`, `Table`,
`Text`: only for the tables of `configs` and `status SWEEP` and for `--watch` (plain lines go
through click: `orchestrator/cli/shared.py`).

`import rich.console` alone costs about as much as starting the interpreter, and `moe-orch --help`
or a failing `validate` never draws a table. For the type checker these names are rich's own
classes; at run time `Console(...)`, `Table(...)` and `Text(...)` import rich on their first call
and return rich's objects, and `out` creates its console on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
else:

    def Console(*args: Any, **kwargs: Any) -> Any:
        from rich.console import Console as RichConsole

        return RichConsole(*args, **kwargs)

    def Table(*args: Any, **kwargs: Any) -> Any:
        from rich.table import Table as RichTable

        return RichTable(*args, **kwargs)

    def Text(*args: Any, **kwargs: Any) -> Any:
        from rich.text import Text as RichText

        return RichText(*args, **kwargs)


class _LazyConsole:
    """A rich Console made at its first use (every attribute is the console's)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            self._console = Console(**self._options)
        return getattr(self._console, name)


# soft_wrap: a line stays one line however narrow the terminal; highlight off: no guessing colours.
out = cast("Console", _LazyConsole(highlight=False, soft_wrap=True))

__all__ = ["Console", "Table", "Text", "out"]
