"""The dev/CI environment lock (requirements.lock): every installed package at an exact version.

``make relock`` resolves pyproject.toml (with the test extra) and constraints.txt in a fresh
virtualenv and writes what got installed with :func:`freeze`; ``make run``, ``make test`` and
``.ci/run`` install exactly those pins (``pip install --no-deps -r requirements.lock``), so a new
release of onnxruntime, numpy or ModelOpt changes nothing until someone relocks on purpose.
pyproject.toml keeps the ranges Kiln supports for users who install it into their own environment.

:func:`differences` names every installed package that differs from the lock: ``make test`` prints
them as a warning, ``make verify`` as the first lines of its report.

Run as ``python -m kiln.envlock check [LOCK]`` or ``python -m kiln.envlock freeze --out LOCK
[--target-dir DIR]``. It imports nothing of Kiln, so it runs in a bare virtualenv.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

LOCK_FILE = "requirements.lock"
# Packages installed with --target outside site-packages (tensorrt-stubs: an importable `tensorrt`
# in site-packages would make ModelOpt believe TensorRT is installed). Lines '#@target NAME==VERSION'.
TARGET_PREFIX = "#@target "
# The project itself (installed editable from the checkout) and pip's own tools are not pinned here.
UNPINNED = {"kiln"}

HEADER = """\
# The dev/CI environment of Kiln, every package at an exact version (transitive ones included).
# Written by `make relock` from pyproject.toml (+ the test extra) and constraints.txt; do not edit by hand.
# make run / make test / .ci/run install it with: pip install --no-deps -r requirements.lock
# Python {python}, {machine}.
"""


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of '-', '_' and '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: str | Path = LOCK_FILE, *, target: bool = False) -> dict[str, str]:
    """The lock's pins, canonical name -> version (``target``: the '#@target' pins instead)."""
    pins: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if target:
            if not line.startswith(TARGET_PREFIX):
                continue
            line = line[len(TARGET_PREFIX):]
        elif not line or line.startswith(("#", "-")):
            continue
        name, sep, version = line.split(";")[0].partition("==")
        if not sep:
            raise ValueError(f"{path}: '{raw}' is not NAME==VERSION: rewrite the lock with `make relock`")
        pins[canonical(name.strip())] = version.strip()
    return pins


def installed(path: list[str] | None = None) -> dict[str, str]:
    """canonical name -> version of every distribution on `path` (default: sys.path), Kiln left out."""
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=path) if path is not None else metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in UNPINNED:
            found.setdefault(canonical(name), dist.version)  # the first on the path is the one imported
    return dict(sorted(found.items()))


def differences(lock: str | Path = LOCK_FILE, have: dict[str, str] | None = None) -> list[str]:
    """One line per installed package that differs from the lock (version, missing, or not locked)."""
    want = read(lock)
    have = installed() if have is None else have
    lines = []
    for name in sorted(set(want) | set(have)):
        if name not in have:
            lines.append(f"{name}: not installed (the lock has {want[name]})")
        elif name not in want:
            lines.append(f"{name} {have[name]}: installed, not in the lock")
        elif have[name] != want[name]:
            lines.append(f"{name}: {have[name]} installed, the lock has {want[name]}")
    return lines


def freeze(out: str | Path, target_dirs: list[str] = ()) -> int:
    """Write the lock of this interpreter's environment (and of packages in `target_dirs`); returns the pin count."""
    import platform

    pins = installed()
    lines = [HEADER.format(python=platform.python_version(), machine=platform.machine())]
    lines += [f"{name}=={version}" for name, version in pins.items()]
    for folder in target_dirs:
        for name, version in installed([str(folder)]).items():
            lines.append(f"{TARGET_PREFIX}{name}=={version}")
    Path(out).write_text("\n".join(lines) + "\n")
    return len(pins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.envlock", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="name every installed package that differs from the lock (exit 0)")
    check.add_argument("lock", nargs="?", default=LOCK_FILE)
    check.add_argument("--strict", action="store_true", help="exit 1 when anything differs")
    fr = sub.add_parser("freeze", help="write the lock of this environment")
    fr.add_argument("--out", default=LOCK_FILE)
    fr.add_argument("--target-dir", action="append", default=[], help="a --target folder whose packages get '#@target' pins")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        n = freeze(args.out, args.target_dir)
        print(f"{args.out}: {n} packages pinned")
        return 0
    try:
        diffs = differences(args.lock)
    except (OSError, ValueError) as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 2
    if diffs:
        print(f"kiln: warning: {len(diffs)} installed package(s) differ from {args.lock} "
              f"(reinstall with `rm -rf .venv && make test`, or relock on purpose with `make relock`):", file=sys.stderr)
        for line in diffs:
            print(f"  {line}", file=sys.stderr)
        return 1 if args.strict else 0
    print(f"kiln: environment matches {args.lock} ({len(read(args.lock))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
