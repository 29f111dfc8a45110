"""``python -m achilles``."""

from achilles.cli import entry

entry()
