# Two commands on a fresh machine: `make train` and `make test` (both install first when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install train eval test test-full lint format tensorboard demo-data bench bench-decode bench-serve clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: install  ## train on the embedded demo set (or pass ARGS="data=cifake ...")
	$(BIN)/python train.py $(ARGS)

eval: install  ## make eval CKPT=path/to.ckpt [ARGS=...]
	$(BIN)/python eval.py ckpt=$(CKPT) $(ARGS)

test: install  ## fast tests
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-full: install  ## every test, the slow ones too
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

tensorboard: install
	$(BIN)/tensorboard --logdir logs --bind_all

bench: install  ## every speed row of docs/speed.md with its target: paths vs the bare-PyTorch limit, large JPEGs, checkpoints, start-up
	$(BIN)/python bench/run.py --means $(ARGS)
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/startup.py

bench-decode: install  ## large JPEGs (draft vs full decode) and checkpoint sizes: [CKPT=a trained 32 px ckpt]
	$(BIN)/python bench/decode.py $(if $(CKPT),--ckpt $(CKPT))

bench-serve: install  ## the service under load: make bench-serve [CKPT=path/to.ckpt] [ARGS=...]
	$(BIN)/python bench/serve.py $(CKPT) $(ARGS)

demo-data: install
	$(BIN)/python -m detector.data.demo data/demo

clean:
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
