# `make demo` and `make test` work on a fresh machine with only Python 3.11 and make:
# they install uv if it is missing, then the locked dependencies.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
RUN := $(UV) run --frozen

.PHONY: install demo up test lint typecheck unit bench soak clean tools

$(UV):
	python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv

# Bytecode is compiled once here: every service and test process imports the same large
# packages, and compiling them at each start costs seconds where bytecode is not written.
.venv/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --quiet --compile-bytecode
	$(UV) run --frozen python -m compileall -q -j 0 agent_orchestrator agents shared support >/dev/null
	@touch $@

install: .venv/.synced

demo: install
	$(RUN) agent-orchestrator demo

up: install
	$(RUN) agent-orchestrator up

lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .

# The registry's folder is hyphenated (the layout fixes it); mypy checks it as the
# package agent_registry through a symlink on its search path.
typecheck: install
	@mkdir -p .mypy_path && ln -sfn ../shared/services/agent-registry .mypy_path/agent_registry
	MYPYPATH=.mypy_path $(RUN) mypy -p shared.lib -p agent_orchestrator -p agents -p agent_registry

# promtool and prometheus (Debian package) for the rule checks and the live dashboard test;
# installed only when missing and possible (root with apt-get), else those tests skip.
tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } \
		|| echo "prometheus is not installed: the Prometheus checks will be skipped"

test: lint typecheck tools
	$(RUN) pytest

bench: install
	$(RUN) agent-orchestrator bench all --json support/bench/results/latest.json
	$(RUN) python -m support.bench.report support/bench/results/latest.json

soak: install
	$(RUN) agent-orchestrator bench soak --minutes 60 --json support/bench/results/soak.json

clean:
	rm -rf .data .venv .mypy_cache .ruff_cache
