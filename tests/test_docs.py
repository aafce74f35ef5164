"""Every command the README and docs/ show still parses: its module and subcommand exist, each
flag is one the command defines, each `--config.FIELD` is a field of the config it names, and
each config file it names is in the repository."""

import glob
import importlib
import os
import re
import shlex

import pytest

from tests.helpers import ROOT

COMMAND = re.compile(r"python3? -m ((?:ddpm_jax|benchmarks)[\w.]*)(.*)")
ABSL_FLAGS = {"verbosity", "v", "helpfull", "help", "helpshort", "alsologtostderr",
              "logtostderr", "flagfile"}
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z_]+)$")  # `...`, `RUN`, `N`: the reader fills them in


def documented_commands():
    """(file, command line) of every `python -m ddpm_jax...` or `python -m benchmarks...` in
    README.md and docs/*.md, continuation lines joined."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as file:
            text = re.sub(r"\\\n\s*", " ", file.read())
        for line in text.splitlines():
            for match in COMMAND.finditer(line):
                rest = re.split(r"`|\s#|&&|\s\|\s|;|\)$", match.group(2))[0]
                found.append((os.path.relpath(path, ROOT), f"{match.group(1)} {rest}".strip()))
    return found


def source_of(module):
    with open(os.path.join(ROOT, *module.split(".")) + ".py") as file:
        return file.read()


def defined_flags(module):
    """The flags a command module defines (absl DEFINE_* or argparse), read from its source."""
    source = source_of(module)
    names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    names |= set(re.findall(r"add_argument\(\s*\"--(\w+)\"", source))
    return names | ABSL_FLAGS


def config_fields(config_path):
    """The config a `--config=` path names (configs/default.py where it is not a file of the
    repository, such as a run's own saved config)."""
    name = "default"
    if config_path and config_path.startswith("configs/") and config_path.endswith(".py"):
        name = os.path.basename(config_path)[:-3]
    return importlib.import_module(f"configs.{name}").get_config()


def has_field(config, dotted):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30
    assert {module for _, command in COMMANDS for module in [command.split()[0]]} >= {
        "ddpm_jax.main", "ddpm_jax.sample", "ddpm_jax.evaluate", "ddpm_jax.convert"}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_each_documented_command_parses(where, command):
    module, *args = shlex.split(command)
    assert os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"), f"{where}: no module {module}"
    flags = defined_flags(module)
    source = source_of(module)
    config_path = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), None)
    if config_path and config_path.startswith("configs/"):
        assert os.path.exists(os.path.join(ROOT, config_path)), f"{where}: {command}: no {config_path}"
    config = config_fields(config_path) if module.startswith("ddpm_jax") else None
    for index, arg in enumerate(args):
        if PLACEHOLDER.match(arg):
            continue
        if not arg.startswith("--"):
            if index == 0:  # a subcommand such as `fid` or `from-diffusers`
                assert f'"{arg}"' in source, f"{where}: {command}: {module} has no command {arg!r}"
            else:  # the value of the flag before it (`--case NAME=...`)
                assert args[index - 1].startswith("--") and "=" not in args[index - 1], (
                    f"{where}: {command}: {arg!r} is neither a flag nor a flag's value")
            continue
        name = arg[2:].split("=", 1)[0]
        if name.startswith("config.") and config is not None:
            assert has_field(config, name[len("config."):]), f"{where}: {command}: no field {name}"
        else:
            bare = name[2:] if name.startswith("no") and name[2:] in flags else name
            assert bare in flags, f"{where}: {command}: {module} has no flag --{name}"
