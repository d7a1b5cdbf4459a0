"""Checks `--config.<field>=<value>` overrides against the config file, before absl parses them.

ml_collections reports an override of a field that does not exist with a bare
KeyError deep inside flag parsing, and a value of the wrong type with a bare
parser error; the trainers call `check_overrides` first and exit with a message
that lists the valid fields, or names the field, the value and the type it
expects, instead.
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
    """Returns an error message for an override that names no field or has a wrong-typed value."""
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
            field, has_value, value = arg[len("--config.") :].partition("=")
            if field not in valid:
                return f"Unknown config field {field!r} (from {arg!r}). Valid fields: " + ", ".join(
                    valid
                )
            if has_value:
                message = _type_problem(field, value, _lookup(config, field))
                if message:
                    return message
    return None


def _lookup(config, field: str):
    """The field's default, or None for a field typed `object` (it takes any value)."""
    *parents, last = field.split(".")
    for part in parents:
        config = config[part]
    if config.get_ref(last).get_type() is object:
        return None  # e.g. meta.neumann_alpha: a number or "auto"; the trainer validates it
    return config[last]


_BOOLS = ("true", "false", "t", "f", "1", "0")


def _type_problem(field: str, value: str, default) -> str | None:
    """A message if `value` cannot be parsed as the type of the field's `default`.

    absl would reject it too, but with a bare parser error ("invalid literal for
    int() with base 10") that does not say what the field expects.
    """
    if isinstance(default, bool):
        ok, expected = value.strip().lower() in _BOOLS, "a bool (true or false)"
    elif isinstance(default, int):
        ok, expected = _parses(int, value), "an int"
    elif isinstance(default, float):
        ok, expected = _parses(float, value), "a number"
    else:
        return None  # strings take anything; tuples are parsed (and checked) by absl
    if ok:
        return None
    return (
        f"config.{field} must be {expected} (its default is {default!r}). "
        f"Received: --config.{field}={value!r}."
    )


def _parses(kind, value: str) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True
