"""Subcommands of the `cloister` console script: one module each, see `cloister.cli`."""
