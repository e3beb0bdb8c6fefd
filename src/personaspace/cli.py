"""The ``personaspace`` command: small utilities around the pipeline.

personaspace panels --write conf/panels.yaml   # regenerate the Hydra panel lists from data/
personaspace params [personas=24 ...]          # compose conf/ into params.yaml, as `dvc exp run` does
personaspace check-params params.yaml          # validate params without running anything
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path
from personaspace.personas import load_catalog

PANELS_HEADER = (
    "# GENERATED from data/personas.yaml by `personaspace panels --write conf/panels.yaml`; do not edit.\n"
    "# Hydra composes these into params.yaml (see conf/config.yaml).\n"
)


def panels_yaml() -> str:
    """conf/panels.yaml: the catalog's nested panels, in the form Hydra composes into params."""
    return PANELS_HEADER + yaml.safe_dump({"panels": load_catalog().panels()}, sort_keys=False)


def compose_params(output: Path, overrides: list[str], conf_dir: Path = Path("conf")) -> None:
    """Compose ``conf/config.yaml`` (+ Hydra overrides) into ``output`` exactly as `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    with atomic_path(output) as tmp:
        compose_and_dump(tmp, str(conf_dir.resolve()), None, "config", str(conf_dir.resolve()), overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personaspace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    panels = sub.add_parser("panels", help="print or write the Hydra panel lists")
    panels.add_argument("--write", type=Path, help="write to this file instead of printing")
    compose = sub.add_parser("params", help="compose conf/ into params.yaml (Hydra overrides allowed)")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. personas=24")
    compose.add_argument("--out", type=Path, default=Path("params.yaml"))
    check = sub.add_parser("check-params", help="validate a params file")
    check.add_argument("path", type=Path, nargs="?", default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if args.command == "panels":
        text = panels_yaml()
        if args.write:
            with atomic_path(args.write) as tmp:
                tmp.write_text(text)
        else:
            sys.stdout.write(text)
    elif args.command == "params":
        compose_params(args.out, args.overrides)
    elif args.command == "check-params":
        try:
            params = load_params(args.path)
        except ParamsError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{args.path}: valid ({params.personas} personas, model {params.model})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
