"""`python -m app` is the `carnet` command."""

from app.cli import main

main()
