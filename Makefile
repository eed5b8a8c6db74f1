# The two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite).
# Both create .venv on first use. On a machine without CUDA the CPU build torch==2.13.0 is
# installed first, so the project's `torch>=2.4` requirement never pulls a multi-GB CUDA build.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup test test-slow demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install "torch>=2.4"; \
	else \
		$(PY) -m pip install "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PY) -m pip install -e ".[test,mnist]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

demo: $(VENV)/.installed
	$(PY) jobs/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
