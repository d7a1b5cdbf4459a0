"""Checks `--config.<field>=<value>` overrides against the config file, before absl parses them.

ml_collections reports an override of a field that does not exist with a bare
KeyError deep inside flag parsing; the trainers call `check_overrides` first
and exit with a message that lists the valid fields instead.
"""

import importlib.util
import pathlib


def _flat_keys(config, prefix="") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if hasattr(value, "items") and not isinstance(value, dict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


def check_overrides(argv: list[str], default_config: pathlib.Path) -> str | None:
    """Returns an error message for `--config.<field>` overrides that name no field."""
    path = str(default_config)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    file, _, variant = path.partition(":")
    if not pathlib.Path(file).is_file():
        return f"--config: no such config file: {file!r}."
    spec = importlib.util.spec_from_file_location("_config_module", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        config = module.get_config(variant or None) if variant else module.get_config()
    except (TypeError, ValueError) as e:
        return f"--config={path}: {e}"
    valid = _flat_keys(config)
    for arg in argv:
        if arg.startswith("--config."):
            field = arg[len("--config.") :].split("=", 1)[0]
            if field not in valid:
                return f"Unknown config field {field!r} (from {arg!r}). Valid fields: " + ", ".join(
                    valid
                )
    return None
