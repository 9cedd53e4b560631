# The verbs of `python -m cluster`, plus set-up and tests. Every target sets itself up.
#   make submit JOB=resnet50 [INVENTORY=rack.yaml] [BACKEND=ssh|slurm|local] [ARGS="train.steps=100"] [DRY_RUN=1]
#   make logs [RUN=id] [FOLLOW=1]   make status [RUN=id]   make stop RUN=id   make plan JOB=...
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# PY=python3 on the command line uses an interpreter that already has torch (no venv, no install)
ifeq ($(origin PY),command line)
STAMP :=
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif
JOB ?= resnet50
RUN ?=
INVENTORY ?=
BACKEND ?=
ARGS ?=
NODES ?= 3
CMD ?=
HOSTS ?=
DETACH ?=
PYTEST_ARGS ?=

TARGET_OPTS = $(if $(INVENTORY),--inventory $(INVENTORY)) $(if $(BACKEND),--backend $(BACKEND))

.PHONY: setup submit plan status logs stop doctor report top tensorboard exec gpus shell jupyter test test-unit fuzz testbed-up testbed-down testbed-deps clean-runs bench-launch image image-push bench-image

setup: $(VENV)/.installed

# everything (requirements.txt: the orchestration and the train, report and test extras); the
# checkout on the venv's path (`python -m cluster` from any directory, tests/ and examples/ too);
# and the `ddp-cluster` command (an editable install of this checkout, no dependencies)
$(VENV)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.10+"; exit 2; }
	@echo ">> creating $(VENV) and installing requirements (torch is large: about 1-2 minutes) ..."
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar on -r requirements.txt
	@$(VENV)/bin/python -c 'import site,sys; open(site.getsitepackages()[0]+"/ddp-cluster.pth","w").write(sys.argv[1]+"\n")' "$(CURDIR)"
	@$(VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(VENV)/.installed
	@echo ">> $(VENV) ready"

submit: $(STAMP)
	@# make follows the run's logs until it ends (DETACH=1 returns at once; the run goes on)
	$(PY) -m cluster submit $(JOB) $(ARGS) $(TARGET_OPTS) $(if $(DRY_RUN),--dry-run,$(if $(DETACH),,--follow))

plan: $(STAMP)
	$(PY) -m cluster plan $(JOB) $(ARGS) $(TARGET_OPTS)

doctor: $(STAMP)
	$(PY) -m cluster doctor $(JOB) $(ARGS) $(TARGET_OPTS)

status: $(STAMP)
	$(PY) -m cluster status $(RUN)

logs: $(STAMP)
	$(PY) -m cluster logs $(RUN) $(if $(FOLLOW),--follow) $(if $(COLLECT),--collect)

stop: $(STAMP)
	$(PY) -m cluster stop $(RUN)

# CMD and HOSTS reach the hosts exactly as typed: through the environment, never spliced into this
# recipe's shell line ($(value ...): not even make expands a '$' in them); only the hosts' sh reads CMD
exec: export CLUSTER_EXEC_CMD := $(value CMD)
exec: export CLUSTER_EXEC_HOSTS := $(value HOSTS)
exec: export CLUSTER_EXEC_RUN := $(value RUN)
exec: $(STAMP)
	@[ -n "$$CLUSTER_EXEC_CMD" ] || { echo 'usage: make exec CMD="nvidia-smi -L" [HOSTS=gpu[01-02]] [RUN=id] [INVENTORY=...]'; exit 2; }
	$(PY) -m cluster exec $(if $(INVENTORY),--inventory $(INVENTORY)) $${CLUSTER_EXEC_RUN:+--run "$$CLUSTER_EXEC_RUN"} $${CLUSTER_EXEC_HOSTS:+--hosts "$$CLUSTER_EXEC_HOSTS"} -- sh -c "$$CLUSTER_EXEC_CMD"

gpus: $(STAMP)
	$(PY) -m cluster gpus $(if $(INVENTORY),--inventory $(INVENTORY))

report: $(STAMP)
	$(PY) -m cluster report $(RUN)

top: $(STAMP)
	$(PY) -m cluster top $(RUN)

# RUN="id1 id2" serves several runs side by side
tensorboard: $(STAMP)
	$(PY) -m cluster tensorboard $(RUN) $(if $(PORT),--port $(PORT))

shell: $(STAMP)
	$(PY) -m cluster shell $(RUN) $(if $(NODE),--node $(NODE))

jupyter: $(STAMP)
	$(PY) -m cluster jupyter $(RUN) $(if $(NODE),--node $(NODE)) $(if $(ON_HOST),--host $(ON_HOST)) $(if $(INVENTORY),--inventory $(INVENTORY)) $(if $(PORT),--port $(PORT))

# the training image (image/Containerfile): IMAGE_OPTS="--base local" where no registry is reachable,
# "--small" for the tests' CPU variant; prints the tag (ddp-train:torch<v>-<cuda>-<commit>)
image:
	$(PYTHON) image/build.py $(IMAGE_OPTS)

image-push: $(STAMP)
	@[ -n "$(IMAGE)" ] || { echo 'usage: make image-push IMAGE=ddp-train:torch... [HOSTS=gpu[01-02]] [INVENTORY=...]'; exit 2; }
	$(PY) -m cluster image push '$(IMAGE)' $(if $(INVENTORY),--inventory $(INVENTORY)) $(if $(HOSTS),--hosts '$(HOSTS)')

bench-image:
	$(PYTHON) bench/bench_image.py $(ARGS)

test: $(STAMP) testbed-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m "not testbed and not slow" $(PYTEST_ARGS)

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(or $(EXAMPLES),2000) $(PY) -m pytest tests/test_fuzz.py -x -q $(PYTEST_ARGS)

testbed-deps: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m tests.testbed install-deps; \
	 else echo ">> not root: skipping Debian packages for the cluster in a box (its tests will skip)"; fi

testbed-up: $(STAMP) testbed-deps
	$(PY) -m tests.testbed up --nodes $(NODES)

testbed-down: $(STAMP)
	$(PY) -m tests.testbed down

bench-launch: $(STAMP)
	$(PY) bench/bench_launch.py $(ARGS)
