"""`kiln` command line: check a config and list what it would build."""

from __future__ import annotations

import argparse
import sys

from kiln.errors import KilnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a config file and list its model x device x precision jobs")
    check.add_argument("configfile", nargs="?", default="config.yaml")
    from kiln import lock

    lock.add_commands(sub)  # `kiln lock`, `kiln verify`
    from kiln import compare

    compare.add_command(sub)  # `kiln compare OLD NEW`
    from kiln import predict

    predict.add_command(sub)  # `kiln predict ENGINE_DIR INPUT... --out DIR`
    args = parser.parse_args(argv)
    if args.command in ("lock", "verify"):
        return lock.run_command(args)
    if args.command == "compare":
        return compare.run_command(args)
    if args.command == "predict":
        return predict.run_command(args)

    from kiln.config import load_file
    from kiln.workflow import buildable, runnable

    try:
        cfg = load_file(args.configfile, base=".")
    except KilnError as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 1
    can_build, can_run = buildable(cfg), runnable(cfg)
    for device, model, precision in cfg.jobs():
        if can_build[device]:
            where = f"not run on this host: {can_build[device]}"
        elif can_run[device]:
            where = f"built here, not validated: {can_run[device]}"
        else:
            where = "built and validated here"
        print(f"{model:20s} {device:16s} {precision:6s} {where}")
    print(f"{args.configfile}: OK, {len(cfg.jobs())} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
