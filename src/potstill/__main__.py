"""``python -m potstill`` (and ``accelerate launch -m potstill distill ...``)."""

from .commands.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
