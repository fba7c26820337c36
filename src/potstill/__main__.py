"""``python -m potstill`` (and ``accelerate launch -m potstill distill ...``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
