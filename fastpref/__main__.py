"""``python -m fastpref demo`` (the main job) and ``python -m fastpref bench`` (the report); see :mod:`fastpref.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
