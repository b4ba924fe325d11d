"""``python -m flowkern ...`` (also what ``accelerate launch -m flowkern train ...`` runs)."""

from flowkern.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
