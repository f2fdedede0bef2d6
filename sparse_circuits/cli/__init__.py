"""The `sparse-circuits` command: main.py builds the parser and dispatches; one module per subcommand
holds that subcommand's arguments (`add_parser`) and its thin `run(args)`. Nothing here imports torch
at module import, so `--help` and argument errors are fast."""
