# make demo: create the environment, install (pip -qq: errors only), run the main job on the demo world.
# make demo DEMO_CONFIG=configs/demo-lit.yaml: the second demo pair (pretrained MiniLM text towers).
# make test: create the environment, install, lint (ruff), run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -qq -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xbt run --config $(DEMO_CONFIG) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf runs .cache/xbt mlflow.db mlartifacts

# make bench: the benchmarks (benchmarks/README.md); PRESET=gpu on a GPU machine.
PRESET ?= small
.PHONY: bench
bench: $(STAMP)
	$(PY) -m benchmarks.bench --preset $(PRESET) $(BENCH_ARGS)

# make cluster-estimate: GPU-hours of docs/cluster.md's upgrade from measured throughputs
# (rewrites its section 6 table; measured on a GPU node, projected from a CPU).
.PHONY: cluster-estimate
cluster-estimate: $(STAMP)
	$(PY) -m benchmarks.cluster_estimate $(ESTIMATE_ARGS)
