"""``python -m fastpref``: the command line (``demo``, the main job, and ``bench``, the benchmark report).

Each command lives in its own module, which gives :func:`add_arguments` (its options, each with help
text) and :func:`run` (what it does with them); this module only dispatches. The numeric option types
below refuse out-of-range values with an argparse error naming the option.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

COMMANDS = {
    "demo": ("fastpref.demo", "The main job (about 2½ minutes on 2 cores): why fastpref exists, measured on this "
                              "machine — memory at a Llama-3 head, a whole DPO training step against TRL's, and a "
                              "MallowsPO run whose loss falls."),
    "bench": ("fastpref.report", "The benchmark report of the README: LM-head DPO steps at Llama-3-8B size, peak "
                                 "memory against tokens, and whole training steps; writes markdown tables, "
                                 "results.json and plots."),
}


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``, or an error naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def even_tokens(text: str) -> int:
    """An argparse ``type``: a token count split into one pair of equal responses (an even integer >= 2)."""
    value = int_at_least(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (one pair of equal-length responses), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastpref",
        description="fastpref: fused, memory-efficient loss kernels for LLM preference optimisation.",
        epilog="Run `python -m fastpref COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0],
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run(args)
