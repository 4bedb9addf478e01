"""Config edits for tests."""

import dataclasses


def with_field(config, path, value):
    """`config` with the nested field `path` ('optimizer.b1') set to `value`."""
    section, name = path.split(".")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})
