"""CLI subcommands: each module exposes ``register(subparsers)`` and is listed in
:data:`achilles.cli.COMMAND_MODULES`. Shared option groups live in :mod:`.common`."""
