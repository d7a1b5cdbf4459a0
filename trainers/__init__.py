"""Thin absl binaries: flags -> locked config -> one library call.

Run each from the repository root with `python -m trainers.<name>`; the config
file it reads by default is named in its `--config` flag and carries the command.
"""
