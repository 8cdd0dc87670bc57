"""Command line: ``python -m fastpref demo`` (the main job) and ``python -m fastpref bench`` (the report)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .report import main as run
    else:
        print("usage: python -m fastpref {demo,bench} [options]   (add --help after a command)", file=sys.stderr)
        raise SystemExit(2)
    run(rest)


if __name__ == "__main__":
    main()
