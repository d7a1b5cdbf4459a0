"""One wording for config errors, shared by every experiment's `validate_config`.

Errors name the field as the user writes it on the command line
(`--config.<field>=...`), the value received and what is expected, and are
raised before any training starts.
"""

from typing import Any


def config_error(field: str, value: Any, expected: str) -> ValueError:
    """`ValueError("config.<field> must be <expected>. Received: config.<field>=<value>.")`."""
    return ValueError(f"config.{field} must be {expected}. Received: config.{field}={value!r}.")


def lookup(config, field: str) -> Any:
    """The value at a dotted `field` ("data.batch_size") of a ConfigDict or mapping."""
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def require_int(config, field: str, minimum: int) -> None:
    """Raises `config_error` unless the dotted `field` is an int (not a bool) >= minimum."""
    value = lookup(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise config_error(field, value, f"an int >= {minimum}")


def require_positive(config, field: str) -> None:
    """Raises `config_error` unless the dotted `field` is a number (not a bool) > 0."""
    value = lookup(config, field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise config_error(field, value, "a number > 0")
