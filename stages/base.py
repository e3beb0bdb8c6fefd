"""Stage `base`: materialise the model named in params as a normal HF folder.

python stages/base.py --params params.yaml --out models/raw
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

from personaspace.checks import ModelFacts, check_stage, model_errors
from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path
from personaspace.models import load_tokenizer, materialise
from personaspace.tracking import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(params, needs=("tracking",))  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    spec = params.model_spec
    tokenizer_source = params.models.get(spec.tokenizer_from or "")
    start = time.perf_counter()
    run_params = {"model": params.model, "source": spec.source, "dtype": spec.dtype}
    with stage_run("base", run_params, study=params.study.name), atomic_path(args.out) as tmp:
        info = materialise(spec, tmp, tokenizer_source=tokenizer_source)
        # the check stage could not see a hub model before it was downloaded: check it now
        problems = model_errors(params, ModelFacts(info["num_hidden_layers"], load_tokenizer(tmp)))
        if problems:
            raise ParamsError("\n".join(problems))
    info["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({"model": params.model, **info}, indent=2))


if __name__ == "__main__":
    main()
