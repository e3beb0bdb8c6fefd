"""personaspace: utilities around the DVC pipeline (the pipeline itself runs with `dvc repro` / `dvc exp run`).

personaspace panels --write conf/panels.yaml   # regenerate the Hydra panel lists from data/
personaspace params [personas=24 ...]          # compose conf/ into params.yaml, as `dvc exp run` does
personaspace check-params params.yaml          # every check of the pipeline's `check` stage, without running it
personaspace analyze em_first --table T.csv --out DIR [--baseline B.csv]   # S2's analysis on per-cell counts
personaspace analyze joint_probe --table T.csv --states raw=R.npz em=E.npz benign=B.npz --out DIR   # S3's
personaspace analyze train_steering --table T.csv --out DIR   # S4's, on rates per (arm, persona, question, mode, coef)
personaspace recover-lock                      # dvc.lock cut short by a Ctrl-C: set aside, the committed one restored
personaspace compare [--keep REGEX] [-A | --rev R]   # experiments side by side, one row per metric
personaspace regress --table T.csv --out DIR   # S1's statistics suite on a (persona, layer) table
personaspace ui [--port 5000]                  # the MLflow UI on this project's runs (prints the URL once it answers)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from personaspace.config import load_params
from personaspace.io import atomic_path
from personaspace.personas import load_catalog

if TYPE_CHECKING:
    import pandas as pd

PANELS_HEADER = (
    "# GENERATED from data/personas.yaml by `personaspace panels --write conf/panels.yaml`; do not edit.\n"
    "# Hydra composes these into params.yaml (see conf/config.yaml).\n"
)


def panels_yaml() -> str:
    """conf/panels.yaml: the catalog's nested panels, in the form Hydra composes into params."""
    return PANELS_HEADER + yaml.safe_dump({"panels": load_catalog().panels()}, sort_keys=False)


def compose_params(output: Path, overrides: list[str], conf_dir: Path = Path("conf")) -> None:
    """Compose ``conf/config.yaml`` (+ Hydra overrides) into ``output`` exactly as `dvc exp run` does.

    Hydra's plugins come from the repo root, as DVC's do (``hydra_plugins/``: the digest resolver
    and the hand-edit guard, which raises DvcException over a hand-edited params.yaml).
    """
    from dvc.utils.hydra import compose_and_dump

    from personaspace.params_guard import COMPOSE_OUT_ENV

    conf_dir = conf_dir.resolve()
    os.environ[COMPOSE_OUT_ENV] = str(Path(output).resolve())  # read by the composition guard (hydra_plugins/)
    try:
        with atomic_path(output) as tmp:
            compose_and_dump(tmp, str(conf_dir), None, "config", str(conf_dir.parent), overrides)
    finally:
        os.environ.pop(COMPOSE_OUT_ENV, None)


REGRESS_MANIFEST = ".personaspace-regress.json"  # lists what `regress` wrote into --out; only those it may replace


def regress_command(args: argparse.Namespace) -> int:
    """Re-analyse a (persona, layer) table: metrics.json, plot data and figures into args.out.

    Everything (params, table, settings, --out) is checked before anything is written; exit code 2 on a refusal.
    """
    import pandas as pd

    from personaspace import plots
    from personaspace.config import StatsParams
    from personaspace.io import OutputError, check_replaceable, json_text, write_manifest
    from personaspace.regress import SettingsError, TableError, regress_table, settings_from_params

    def refuse(message: str) -> int:
        print(message, file=sys.stderr)
        return 2

    if not args.params.is_file():
        return refuse(f"{args.params} not found: pass --params with a `stats` section (the repo's params.yaml has one)")
    raw = yaml.safe_load(args.params.read_text()) or {}
    try:
        stats = StatsParams.model_validate(raw.get("stats"))
    except Exception as exc:
        return refuse(f"{args.params}: the `stats` section is invalid: {exc}")
    if not args.table.is_file():
        return refuse(f"--table {args.table}: no such file")
    try:
        table = pd.read_parquet(args.table) if args.table.suffix == ".parquet" else pd.read_csv(args.table)
    except (ValueError, OSError) as exc:  # pandas' EmptyDataError / ParserError and pyarrow's errors are ValueErrors
        return refuse(f"--table {args.table}: not a readable CSV or parquet table: {exc}")
    try:
        check_replaceable(args.out, REGRESS_MANIFEST)
    except OutputError as exc:
        return refuse(f"--out {exc}; choose a new --out or empty it")
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            return refuse(f"--tokenizer {args.tokenizer}: not a tokenizer folder ({exc})")
    calibration = [p.strip() for p in args.calibration.split(",")] if args.calibration else None
    settings = settings_from_params(
        stats, seed=args.seed if args.seed is not None else int(raw.get("seed", 0)), primary_layer=args.primary_layer,
        calibration=calibration, tokenizer=tokenizer, reference_persona=args.reference,
        fit_reference=args.include_reference,
    )  # fmt: skip
    try:
        metrics, plot_data = regress_table(table, settings)
    except TableError as exc:
        return refuse(f"--table {args.table}: {exc}")
    except SettingsError as exc:
        return refuse(str(exc))
    with atomic_path(args.out) as out:
        out.mkdir()
        (out / "metrics.json").write_text(json_text(metrics))
        for name, frame in plot_data.items():
            frame.to_csv(out / f"{name}.csv", index=False)
        primary = metrics["primary_layer"]
        plots.hero_scatter(plot_data["scatter"], out / "scatter", primary, settings.reference_persona)
        plots.rho_by_layer(plot_data["rho_by_layer"], out / "rho_by_layer", metrics["n_personas"], stats.alpha)
        plots.forest_plot(plot_data["rates"], out / "rates_forest")
        write_manifest(out, REGRESS_MANIFEST)
    gates = metrics["gates"]
    layer = metrics["layers"][str(primary)]
    print(
        f"{metrics['n_personas']} personas, primary layer {primary}: Spearman rho = {layer['spearman']['rho']}, "
        f"p = {layer['spearman']['p']}; three-gate outcome: {gates['outcome']}; wrote {args.out}/"
    )
    return 0


ANALYZE_MANIFEST = ".personaspace-analyze-{study}.json"  # what `analyze <study>` wrote into --out


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV or parquet table (by suffix); ValueError/OSError when unreadable."""
    import pandas as pd

    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def analyze_command(args: argparse.Namespace) -> int:
    """Re-analyse a study's per-cell counts (em_first: S2) into args.out: metrics.json, plot tables, figures.

    The same function the pipeline's analysis stage calls. Everything (params, preset, role overrides,
    tables, --out) is checked and the analysis computed before anything is written; exit code 2 on a refusal.
    """
    from pydantic import ValidationError

    from personaspace import plots
    from personaspace.analyses import TableError
    from personaspace.analyses.em_first import analyze_em_first, summary_line
    from personaspace.config import StatsParams, StudyParams, format_validation_error
    from personaspace.io import OutputError, check_replaceable, json_text, write_manifest
    from personaspace.study import StudyError

    def refuse(message: str) -> int:
        print(message, file=sys.stderr)
        return 2

    if not args.params.is_file():
        return refuse(f"{args.params} not found: pass --params with a `stats` section (the repo's params.yaml has one)")
    try:
        raw = yaml.safe_load(args.params.read_text()) or {}
    except yaml.YAMLError as exc:
        return refuse(f"--params {args.params}: not readable YAML: {exc}".replace("\n", " "))
    if not isinstance(raw, dict):
        return refuse(f"--params {args.params}: not a mapping of params")
    try:
        stats = StatsParams.model_validate(raw.get("stats"))
    except ValidationError as exc:
        return refuse(format_validation_error(exc, f"{args.params}: the `stats` section").replace("\n", " "))
    composed = raw.get("study")
    if args.study_file is None and isinstance(composed, dict) and composed.get("name") == args.study:
        # the experiment's own study, with any `-S study.em_first...` override it ran with
        study_file, raw_study = args.params, dict(composed)
    else:
        study_file = args.study_file or Path("conf/study") / f"{args.study}.yaml"
        if not study_file.is_file():
            return refuse(f"--study {study_file}: no such file; pass the study preset (conf/study/{args.study}.yaml)")
        try:
            raw_study = yaml.safe_load(study_file.read_text()) or {}
        except yaml.YAMLError as exc:
            return refuse(f"--study {study_file}: not readable YAML: {exc}".replace("\n", " "))
    if not isinstance(raw_study, dict):
        return refuse(f"--study {study_file}: not a mapping of study settings")
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:  # a preset's interpolations (e.g. `pool: ${panels.n12}`) resolve against --params
        raw_study = OmegaConf.to_container(OmegaConf.create({**raw, "study": raw_study}), resolve=True)["study"]
    except OmegaConfBaseException as exc:
        return refuse(f"--study {study_file}: cannot resolve its interpolations against {args.params}: {exc}")
    if args.sources is not None:
        raw_study["sources"] = _names(args.sources)
    if args.negatives is not None:
        raw_study["negatives"] = {**(raw_study.get("negatives") or {}), "hard": _names(args.negatives), "k": 0}
    if args.assistant is not None:
        raw_study["assistant"] = None if args.assistant.lower() == "none" else args.assistant
    try:
        study = StudyParams.model_validate(raw_study)
    except ValidationError as exc:
        return refuse(format_validation_error(exc, f"--study {study_file}").replace("\n", " "))
    if study.name != args.study or args.study not in study.analyses:
        return refuse(
            f"--study {study_file}: is the {study.name!r} preset (analyses {study.analyses}), not {args.study!r}"
        )
    tables = {}
    for option, path in (("--table", args.table), ("--baseline", args.baseline)):
        if path is None:
            continue
        if not path.is_file():
            return refuse(f"{option} {path}: no such file")
        try:
            tables[option] = _read_table(path)
        except (ValueError, OSError) as exc:  # pandas' and pyarrow's parse errors are ValueErrors
            return refuse(f"{option} {path}: not a readable CSV or parquet table: {exc}".replace("\n", " "))
    manifest = ANALYZE_MANIFEST.format(study=args.study)
    try:
        check_replaceable(args.out, manifest)
    except OutputError as exc:
        return refuse(f"--out {exc}; choose a new --out or empty it")
    seed = args.seed if args.seed is not None else int(raw.get("seed", 0))
    try:
        if args.study == "joint_probe":
            from personaspace.analyses import joint_probe

            states = {}
            for spec in args.states or []:
                name, _, path = spec.partition("=")
                if not path or not Path(path).is_file():
                    return refuse(f"--states {spec}: give BASE=PATH to an existing states.npz (the centroids stage's)")
                states[name] = joint_probe.load_states(
                    Path(path), study.joint_probe.readout if study.joint_probe else "", base=name
                )
            metrics, plot_data = joint_probe.analyze_joint_probe(
                tables["--table"], tables.get("--baseline"), states, study, stats, seed
            )
            figures, line = plots.joint_probe_figures, joint_probe.summary_line(metrics)
        elif args.study == "train_steering":
            from functools import partial

            from personaspace.analyses import train_steering
            from personaspace.study import check_train_steering

            cfg = check_train_steering(study, int(raw.get("seed", 0)))  # the study seed draws the negatives
            metrics, plot_data = train_steering.analyze_train_steering(
                tables["--table"], cfg, stats, seed, personas=study.sources
            )
            figures = partial(plots.train_steering_figures, pass_rho=cfg.pass_rho)
            line = train_steering.summary_line(metrics)
        else:
            metrics, plot_data = analyze_em_first(tables["--table"], tables.get("--baseline"), study, stats, seed)
            figures, line = plots.em_first_figures, summary_line(metrics)
    except TableError as exc:  # the message says `table` (--table), `baseline` (--baseline) or `states`
        return refuse(f"{exc} (--table {args.table}" + (f", --baseline {args.baseline})" if args.baseline else ")"))
    except StudyError as exc:
        return refuse(f"--study {study_file} (with any role overrides): {exc}")
    with atomic_path(args.out) as out:
        out.mkdir()
        (out / "metrics.json").write_text(json_text(metrics))
        for name, frame in plot_data.items():
            frame.to_csv(out / f"{name}.csv", index=False)
        figures(plot_data, out)
        write_manifest(out, manifest)
    print(f"{args.study}: {line}; wrote {args.out}/")
    return 0


def ui_command(port: int, timeout: float = 180) -> int:
    """`mlflow server` on the project's runs; prints the URL of the runs table once the server answers (MLflow
    3.17 opens an experiment on its GenAI overview unless the URL or the sidebar picks the model-training view)."""
    import subprocess

    import mlflow

    from personaspace.browser import wait_healthy
    from personaspace.tracking import EXPERIMENT, runs_table_url, server_command, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"no runs yet ({uri} does not exist): run `dvc repro` first", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    server = f"http://127.0.0.1:{port}"
    print(f"starting the MLflow UI on {uri} (~30 s) ...", flush=True)
    process = subprocess.Popen(server_command(uri, port))
    try:
        wait_healthy(server, process, timeout)
        page = runs_table_url(server, experiment.experiment_id) if experiment is not None else server
        print(f"MLflow UI ready: {page}  (Ctrl-C stops it)", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 2
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="personaspace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    panels = sub.add_parser("panels", help="print or write the Hydra panel lists")
    panels.add_argument("--write", type=Path, help="write to this file instead of printing")
    compose = sub.add_parser("params", help="compose conf/ into params.yaml (Hydra overrides allowed)")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. personas=24")
    compose.add_argument("--out", type=Path, default=Path("params.yaml"))
    check = sub.add_parser("check-params", help="every check the pipeline's `check` stage runs, without DVC")
    check.add_argument("path", type=Path, nargs="?", default=Path("params.yaml"))
    check.add_argument("--raw", type=Path, default=Path("models/raw"), help="a materialised model, if any (faster)")
    regress = sub.add_parser("regress", help="the S1 statistics suite on a (persona, layer) table")
    regress.add_argument("--table", type=Path, required=True, help="CSV or parquet: persona, category, layer, ...")
    regress.add_argument(
        "--out", type=Path, required=True,
        help="folder for metrics.json, plot data, figures; refused if it holds files a previous run did not write",
    )  # fmt: skip
    regress.add_argument("--primary-layer", type=int, help="default: the only or the middle layer")
    regress.add_argument("--calibration", help="comma-separated personas to fit on; the others are predicted")
    regress.add_argument("--seed", type=int, help="default: params.yaml's seed")
    regress.add_argument("--reference", help="reference persona (default: stats.reference_persona)")
    regress.add_argument(
        "--include-reference", action=argparse.BooleanOptionalAction, default=None,
        help="keep the reference persona (cosine 1) in every fit, as the lab's published fits do "
        "(default: stats.fit_reference, false: left out)",
    )  # fmt: skip
    regress.add_argument("--tokenizer", help="a tokenizer folder for the BPE-Jaccard baseline (e.g. models/raw)")
    regress.add_argument("--params", type=Path, default=Path("params.yaml"), help="thresholds: its `stats` section")
    analyze = sub.add_parser(
        "analyze",
        help="a study's analysis on a hand-made or published table (em_first: S2; joint_probe: S3; train_steering: S4)",
    )
    analyze.add_argument("study", choices=["em_first", "joint_probe", "train_steering"], help="which study's analysis")
    analyze.add_argument(
        "--table", type=Path, required=True,
        help="CSV or parquet, one row per (condition, [recipe,] persona, question_id): fired, n [, mean_tokens | "
        "truncated]; joint_probe needs recipe; train_steering: one row per (arm, persona, question_id, mode, coef): "
        "fired, n (data/steer_eval/<condition>/counts.parquet)",
    )  # fmt: skip
    analyze.add_argument(
        "--out", type=Path, required=True,
        help="folder for metrics.json, plot tables, figures; refused if it holds files a previous run did not write",
    )  # fmt: skip
    analyze.add_argument("--baseline", type=Path, help="the pre-coupling false-positive eval, same columns")
    analyze.add_argument(
        "--states", nargs="+", metavar="BASE=PATH",
        help="joint_probe: each pretrained base's per-question readouts (data/centroids/<base>/states.npz)",
    )  # fmt: skip
    analyze.add_argument("--params", type=Path, default=Path("params.yaml"), help="its `stats` section and `seed`")
    analyze.add_argument(
        "--study",
        dest="study_file",
        type=Path,
        help="the study preset (default: --params' own study when it is this one, else conf/study/<study>.yaml)",
    )
    analyze.add_argument("--seed", type=int, help="bootstrap seed (default: --params' seed)")
    analyze.add_argument("--sources", help="override the preset's sources (comma-separated personas)")
    analyze.add_argument("--negatives", help="override the preset's named negatives (comma-separated personas)")
    analyze.add_argument("--assistant", help="override the preset's assistant persona (`none`: no assistant)")
    sub.add_parser(
        "recover-lock",
        help="a dvc.lock cut short (Ctrl-C while DVC wrote it): set it aside, restore the committed one",
    )
    compare = sub.add_parser(
        "compare", help="the study's metrics of the workspace, HEAD and its experiments side by side, a row each"
    )
    compare.add_argument("--keep", help="only rows matching this regular expression (params rows stay)")
    compare.add_argument("--precision", type=int, default=4, help="significant digits (default 4)")
    compare.add_argument("--study", help="whose metrics/<study>/ files (default: params.yaml's study)")
    compare.add_argument("-A", "--all-commits", action="store_true", help="every commit's experiments")
    compare.add_argument("--rev", action="append", default=[], help="a commit whose experiments to add")
    ui = sub.add_parser("ui", help="the MLflow UI on this project's runs, opening on the runs table")
    ui.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.command == "ui":
        return ui_command(args.port)
    if args.command == "compare":
        from personaspace.compare import exp_show_json, headline_table

        study = args.study or yaml.safe_load(Path("params.yaml").read_text())["study"]["name"]
        extra = (["-A"] if args.all_commits else []) + [arg for rev in args.rev for arg in ("--rev", rev)]
        print(headline_table(exp_show_json(extra), study, keep=args.keep, precision=args.precision))
        return 0
    if args.command == "recover-lock":
        from personaspace.dvc_lock import recover_lock

        print(recover_lock(Path.cwd()))
        return 0
    if args.command == "panels":
        text = panels_yaml()
        if args.write:
            with atomic_path(args.write) as tmp:
                tmp.write_text(text)
        else:
            sys.stdout.write(text)
    elif args.command == "params":
        from dvc.exceptions import DvcException
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            compose_params(args.out, args.overrides)
        except (DvcException, HydraException, OmegaConfBaseException) as exc:  # a refused or unknown override
            print(exc, file=sys.stderr)
            return 2
        written = yaml.safe_load(args.out.read_text())
        print(f"wrote {args.out}: study {written['study']['name']}, scale {written['scale']}, model {written['model']}, "
              f"{written['personas']} personas; `git diff {args.out}` shows what changed, `git restore {args.out}` "
              "undoes it")  # fmt: skip
    elif args.command == "regress":
        return regress_command(args)
    elif args.command == "analyze":
        return analyze_command(args)
    elif args.command == "check-params":
        from personaspace.checks import check_params

        problems, notes = check_params(args.path, raw_dir=args.raw)
        for note in notes:
            print(f"note: {note}")
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2
        params = load_params(args.path)
        print(f"{args.path}: valid ({params.personas} personas, model {params.model})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
