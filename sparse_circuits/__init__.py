"""sparse-circuits, the application: the `sparse-circuits` command, the demo and the shared pipelines.

It sits on top of the three libraries (`sae`, `circuits`, `tasks`) and is the only package that
imports all of them; none of them imports it. `python -m sparse_circuits` is the command.
Importing this package imports nothing heavy: `--help` never loads torch.
"""
