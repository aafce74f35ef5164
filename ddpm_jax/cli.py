"""What every command does with its command line and its console.

`app.run(main, flags_parser=cli.flags_parser(name))` parses the flags; a wrong `--config`
path, an unknown `--config.*` field (with the closest valid names), a value of the wrong
type or an unknown flag ends the command with one message that says what to change. Then
the console is quieted (`quiet_library_logs`): the command's own INFO lines show, the
libraries' (JAX, Orbax, TFDS, TensorFlow, clu) only from WARNING up unless `--verbosity=1`.
"""

from __future__ import annotations

import difflib
import os
import runpy
import sys
from collections.abc import Callable

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ddpm_jax import console, image_utils
from ddpm_jax.core.errors import UserError


def _config_file(argv: list[str]) -> str | None:
    """The file given as --config=FILE[:ARG] (or --config FILE), if any."""
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def field_names(config: object, prefix: str = "") -> list[str]:
    """Every field of a ConfigDict as a dotted path."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, "items"):
            names += field_names(value, f"{prefix}{key}.")
    return names


def _unknown_fields(argv: list[str], config_file: str) -> list[str]:
    """One line per --config.FIELD override that the config file lacks, with close names."""
    path, _, arg = config_file.partition(":")
    module = runpy.run_path(path)
    config = module["get_config"](arg) if arg else module["get_config"]()
    names = field_names(config)
    lines = []
    for item in argv:
        if not item.startswith("--config."):
            continue
        name = item[len("--config."):].split("=", 1)[0]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            lines.append(f"--config.{name}: {path} has no field {name!r}{hint} "
                         "(configs/default.py lists every field)")
    return lines


def check_output(flag: str, path: str | None) -> None:
    """Raises UserError unless a file can be written at `path` (the value of `--flag`):
    checked before any work, which an unwritable output would lose."""
    if not path:
        return
    try:
        image_utils.check_writable(path)
    except OSError as error:
        raise UserError(f"cannot write --{flag}={path!r} ({console.os_error_cause(error)}: "
                        f"{error}); choose another path") from error


def last_override_wins(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with only the last of each repeated `--config.FIELD=VALUE`, a note per field
    given more than once).

    ml_collections joins repeated overrides of a tuple field into one tuple (`=(16,)` then
    `=()` trains `(16,)`), so a command built from shared flags plus one's own would train
    another net without a word; every other flag already takes its last value."""
    last: dict[str, int] = {}
    counts: dict[str, int] = {}
    for index, arg in enumerate(argv):
        if arg.startswith("--config.") and "=" in arg:
            name = arg.split("=", 1)[0]
            last[name] = index
            counts[name] = counts.get(name, 0) + 1
    kept = [arg for index, arg in enumerate(argv)
            if not (arg.startswith("--config.") and "=" in arg)
            or last[arg.split("=", 1)[0]] == index]
    notes = [f"{name} was given {count} times: the last one, "
             f"{argv[last[name]].split('=', 1)[1]!r}, applies"
             for name, count in counts.items() if count > 1]
    return kept, notes


def overrides_summary(config_flag: flags.Flag) -> str:
    """The `--config` file and every overridden field with the value that trains, parsed."""

    values = config_flags.get_override_values(config_flag)
    fields = ", ".join(f"{name}={value!r}" for name, value in sorted(values.items()))
    return f"config {config_flags.get_config_filename(config_flag)}" + (
        f" with {fields}" if fields else " (no overrides)")


def flags_parser(command: str) -> Callable[[list[str]], list[str]]:
    """A flags parser for `app.run` that ends `command` with one line on a bad flag."""

    def parse(argv: list[str]) -> list[str]:
        argv, notes = last_override_wins(argv)
        try:
            remaining = flags.FLAGS(argv)
            if "config" in flags.FLAGS and flags.FLAGS["config"].present:
                flags.FLAGS.config.keys()  # a config that failed to load raises on first use
        except Exception as error:  # absl and ml_collections raise several kinds
            sys.exit(f"{command}: {_explain(argv, error)}")
        console.quiet_library_logs(flags.FLAGS.verbosity)
        for note in notes:
            absl_logging.warning("%s", note)
        return remaining

    return parse


def _explain(argv: list[str], error: Exception) -> str:
    config_file = _config_file(argv[1:])
    if config_file is not None:
        path = config_file.partition(":")[0]
        if not os.path.isfile(path):
            return (f"--config={config_file}: no such file (from {os.getcwd()}); the setups are "
                    "in configs/, e.g. --config=configs/quickstart.py")
        try:
            unknown = _unknown_fields(argv[1:], config_file)
        except Exception:  # the config file itself is broken: report the original error
            unknown = []
        if unknown:
            return "\n".join(unknown)
    message = str(error).strip().splitlines()
    return (message[0] if message else type(error).__name__) + (
        " (see --helpfull; config fields are documented in configs/default.py)")
