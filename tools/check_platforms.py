"""Where the install resolves: each platform and Python, read from pyproject.toml itself.

For every (platform, Python) it asks pip to resolve the project's dependencies (plus the
`--extras` named) for that platform without installing anything:
`pip install --dry-run --ignore-installed --only-binary=:all: --platform TAG --python-version V`.
Environment markers are evaluated for the target platform, not this machine. macOS is tried at
several versions: the lowest that resolves is the minimum macOS. Prints a table and writes JSON:

    python tools/check_platforms.py --json=platforms.json
    python tools/check_platforms.py --extras=tfds --python=3.12

Needs network access to a package index. `promise` (a TFDS dependency) ships only as a source
archive and `--platform` forbids source builds: its wheel is built once, here, and offered with
`--find-links`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANYLINUX = ("manylinux1", "manylinux2010", "manylinux2014", "manylinux_2_5", "manylinux_2_12",
             "manylinux_2_17", "manylinux_2_24", "manylinux_2_27", "manylinux_2_28")
SHOWN = ("jax", "jaxlib", "flax", "tensorflow", "tensorflow-cpu")  # versions in the table


def platforms(macos_versions: list[str]) -> list[dict]:
    """(name, pip --platform tags, marker environment) of each target."""
    targets = []
    for machine in ("x86_64", "aarch64"):
        targets.append({"name": f"Linux {machine}", "tags": [f"{tag}_{machine}" for tag in MANYLINUX],
                        "env": {"sys_platform": "linux", "platform_system": "Linux",
                                "platform_machine": machine}})
    for version in macos_versions:
        targets.append({"name": f"macOS {version} arm64",
                        "tags": [f"macosx_{version}_0_arm64"],
                        "env": {"sys_platform": "darwin", "platform_system": "Darwin",
                                "platform_machine": "arm64"}})
    return targets


def requirements(extras: list[str]) -> list[Requirement]:
    """The project's dependencies and those of `extras`, as pyproject.toml lists them."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        project = tomllib.load(file)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        if extra not in project["optional-dependencies"]:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml "
                             f"(there are: {', '.join(project['optional-dependencies'])})")
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def for_target(reqs: list[Requirement], env: dict, python: str) -> list[str]:
    """The requirements whose markers hold on the target, written without their markers."""
    environment = {**default_environment(), **env, "python_version": python,
                   "python_full_version": f"{python}.0"}
    kept = []
    for req in reqs:
        if req.marker is None or req.marker.evaluate(environment):
            req = Requirement(str(req))
            req.marker = None
            kept.append(str(req))
    return kept


def resolve(reqs: list[str], tags: list[str], python: str, find_links: str) -> dict:
    """pip's dry-run resolution: {"ok": True, "versions": {...}} or {"ok": False, "error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                "--only-binary=:all:", "--python-version", python, "--target", tmp,
                "--find-links", find_links, "--report", report, "--quiet",
                *(f"--platform={tag}" for tag in tags), *reqs]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
            return {"ok": False, "error": (lines or result.stderr.splitlines() or ["?"])[0]}
        with open(report) as file:
            installed = json.load(file)["install"]
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in installed}
    return {"ok": True, "versions": {name: versions[name] for name in SHOWN if name in versions},
            "packages": len(versions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.11,3.12,3.13")
    parser.add_argument("--macos", default="11,12,13,14", help="macOS versions to try (arm64)")
    parser.add_argument("--extras", default="", help="comma-separated extras to add")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    extras = [extra for extra in args.extras.split(",") if extra]
    reqs = requirements(extras)
    rows = []
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels,
                        "promise"], check=True)
        for python in args.python.split(","):
            for target in platforms([version for version in args.macos.split(",") if version]):
                outcome = resolve(for_target(reqs, target["env"], python), target["tags"], python,
                                  wheels)
                rows.append({"python": python, "platform": target["name"], **outcome})
                shown = (", ".join(f"{k} {v}" for k, v in outcome["versions"].items())
                         if outcome["ok"] else outcome["error"])
                print(f"| {python} | {target['name']} | {'resolves' if outcome['ok'] else 'fails'} "
                      f"| {shown} |", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"extras": extras, "pip": subprocess.run(
                [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
            ).stdout.strip(), "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
