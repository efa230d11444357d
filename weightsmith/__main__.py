"""`python -m weightsmith ...` is the `weightsmith` command (useful before the package is installed)."""

from weightsmith.app.cli import entry

entry()
