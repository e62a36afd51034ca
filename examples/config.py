"""YAML config files for examples/train.py: ``--config configs/digits_topk.yaml``.

A config maps flag names to values, written with ``-`` or ``_`` and without the leading dashes
(``batch-size: 64`` or ``batch_size: 64``). Flags given on the command line win over the file.

The file's values are turned back into command-line arguments and parsed *before* the real
ones, so they go through the same ``type`` and ``choices`` checks as typed flags (argparse
does not check ``set_defaults`` values) and a later flag simply overrides them. An unknown key
is an error that names it and lists the keys allowed.

Example::

    # configs/digits_topk.yaml
    topk: 0.01
    epochs: 10
    batch-size: 32

    horovodrun -np 2 python examples/train.py --config configs/digits_topk.yaml --epochs 2
"""

from __future__ import annotations

import argparse

import yaml

__all__ = ["load_config", "config_argv"]


def load_config(path: str) -> dict:
    """Read ``path`` (YAML) into ``{flag_name: value}``; an empty file gives ``{}``."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of flag names to values, "
                         f"got {type(data).__name__}")
    return data


def _flags(parser: argparse.ArgumentParser) -> dict:
    """``{dest: action}`` for every long option of ``parser`` except --help and --config."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in ("help", "config")}


def to_argv(config: dict, parser: argparse.ArgumentParser, source: str = "config") -> list:
    """Turn ``config`` into the argument list that sets the same values.

    Raises:
        ValueError: naming every unknown key, or a boolean flag given a non-boolean value.
    """
    flags = _flags(parser)
    unknown = [k for k in config if str(k).lstrip("-").replace("-", "_") not in flags]
    if unknown:
        allowed = ", ".join(sorted(d.replace("_", "-") for d in flags))
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {allowed}")
    argv = []
    for key, value in config.items():
        action = flags[str(key).lstrip("-").replace("-", "_")]
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true / store_false
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} is a switch and takes true or false, got {value!r}")
            if value != action.default:
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def config_argv(argv: list, parser: argparse.ArgumentParser) -> list:
    """The arguments that ``--config FILE`` in ``argv`` stands for ([] without --config).

    Put them before ``argv`` so the command line overrides the file:
    ``parser.parse_args(config_argv(argv, parser) + argv)``. Errors go to ``parser.error``.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return []
    try:
        return to_argv(load_config(path), parser, source=path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        parser.error(f"--config: {e}")
