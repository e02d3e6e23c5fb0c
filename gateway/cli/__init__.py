"""The `gateway` command, one module per group of subcommands."""
