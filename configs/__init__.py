"""Experiment configs: one `ml_collections.ConfigDict` file per experiment.

Each file's `get_config()` returns the locked config and its docstring carries the
command that runs it. Binaries load them with `--config=configs/<name>.py` and take
`--config.<field>=<value>` overrides.
"""
