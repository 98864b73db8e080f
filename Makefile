# hem-bootstrap: the two commands. Both create .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned here (not in pyproject) to the CPU-runnable builds on this disk;
# on other machines install the torch you want first and `pip install -e .` keeps it.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean-demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PIN)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/hem run configs/demo.yaml --set rounds.out_dir=$(CURDIR)/runs --fresh

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check hem_bootstrap tests scripts
	$(BIN)/mypy hem_bootstrap

clean-demo:
	rm -rf runs/demo
