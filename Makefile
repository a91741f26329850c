# agecls: `make help` lists the targets.
PYTHON ?= python3
# The real UTKFace crops used by tests and benchmarks; override with AGECLS_UTKFACE_DIR=/path.
AGECLS_UTKFACE_DIR ?= $(abspath $(CURDIR)/../shared/data/utkface)
export AGECLS_UTKFACE_DIR
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo train sweep test test-full bench tensorboard lint clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: ## Install agecls (editable) with its test tools
	$(PYTHON) -m pip install -e '.[dev]'

demo: ## Offline demo: fine-tune pretrained EfficientNet-Lite0 on synthetic faces (CPU, minutes)
	$(PYTHON) -m agecls.train experiment=demo $(ARGS)

train: ## Train on UTKFace: make train ARGS="backbone=resnet18 freeze=false"
	$(PYTHON) -m agecls.train data=utkface $(ARGS)

sweep: ## The study's sweep on UTKFace: optimizer {sgd,adam} x lr {1e-4,1e-3,1e-2}
	$(PYTHON) -m agecls.train -m data=utkface optimizer=sgd,adam lr=1e-4,1e-3,1e-2 $(ARGS)

test: ## Fast tests (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

test-full: ## All tests, the slow ones included
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: ## Input-pipeline benchmark: make bench ARGS="backbone=resnet18 data.image_size=128"
	$(PYTHON) -m agecls.bench $(ARGS)

tensorboard: ## TensorBoard over every run in outputs/
	tensorboard --logdir outputs

lint: ## Ruff
	$(PYTHON) -m ruff check src tests

clean: ## Remove run outputs and caches of this checkout (not ~/.cache/agecls)
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
