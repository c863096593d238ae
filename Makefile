# The two commands of the README: `make demo` and `make test`. Each creates .venv
# and installs what it needs on a fresh machine (Python 3.9+ with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeship-installed
TFLITE_VENV := .venv-tflite
PYTEST_ARGS ?=

.PHONY: protos demo test test-fast test-tflite test-arm system-packages bench bench-arm lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	@# tensorflow-serving-api requires the `tensorflow` distribution; [convert] has tensorflow-cpu,
	@# which holds the protos it needs: installed without its dependencies (pyproject: tfserving-client)
	$(BIN)/python -m pip install --quiet --no-deps 'tensorflow-serving-api>=2.21,<2.22'
	@touch $@

## demo: the main job end to end on the embedded defaults (no broker, no device, no account)
demo: $(STAMP)
	$(BIN)/python examples/digits/run.py
	$(BIN)/python examples/digits/fleet_demo.py

## test: the whole suite, slow tests included (what CI runs): first the runtime and agent
## tests on tflite_runtime 2.14 in its own environment (numpy < 2), then everything else
test: system-packages $(STAMP) $(TFLITE_VENV)/.edgeship-installed $(TFLITE_VENV)/models/reference.npz
	$(MAKE) --no-print-directory test-tflite PYTEST_ARGS="-q"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## system-packages: Mosquitto, sshd, PostgreSQL, python3-venv with apt-get where we may (root
## or sudo without a password); without them the tests that need them skip
system-packages:
	@bash .ci/system-packages

## test-fast: the suite without the tests marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## test-tflite: runtime and agent tests on tflite_runtime 2.14 (needs numpy < 2: its own venv)
$(TFLITE_VENV)/.edgeship-installed: pyproject.toml
	@test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install --quiet 'tflite-runtime==2.14.*' 'numpy<2'
	$(TFLITE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(TFLITE_VENV)/bin/python -m pip install --quiet 'cryptography>=42' 'bcrypt>=4' 'tuf>=5,<8' 'securesystemslib>=1.0' \
		'paho-mqtt>=2.0,<3' 'click>=8.1' 'tomli>=2; python_version < "3.11"' psutil pytest pytest-timeout \
		'pysimdjson>=7.0'
	@touch $@

$(TFLITE_VENV)/models/reference.npz: $(STAMP) tests/agent_tflite_models.py
	$(BIN)/python tests/agent_tflite_models.py $(TFLITE_VENV)/models

test-tflite: $(TFLITE_VENV)/.edgeship-installed $(TFLITE_VENV)/models/reference.npz
	EDGESHIP_TFLITE_MODELS=$(TFLITE_VENV)/models $(TFLITE_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_agent_tflite.py tests/test_agent_state_machine.py $(PYTEST_ARGS)

## test-arm: the device agent on arm64 and armhf Debian bookworm roots (Raspberry Pi OS
## 64-bit and 32-bit) under qemu-user-static, installed from the project's wheel as a device
## would (needs root; roots cached in /var/cache/edgeship-arm); CI runs `.ci/arm/test-arm --ci`
test-arm: system-packages $(STAMP)
	bash .ci/arm/test-arm

## bench-arm: the emulated devices' figures (install size, idle RSS, start to first
## prediction, emulation factor) into docs/benchmarks.md; needs root like test-arm
bench-arm: system-packages $(STAMP)
	$(BIN)/python benchmarks/arm.py --write

## bench: the benchmarks; results go to docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python benchmarks/conversion.py --write docs/benchmarks.md
	$(BIN)/python benchmarks/verify.py
	$(BIN)/python benchmarks/agent.py --write
	$(BIN)/python benchmarks/blocks.py
	$(BIN)/python benchmarks/fleet_store.py --write
	$(BIN)/python benchmarks/fleet_sim.py
	$(BIN)/python benchmarks/broker.py --write

## protos: regenerate the agent's gRPC message modules from device-agent/agent/protos/*.proto
protos: $(STAMP)
	$(BIN)/python device-agent/agent/protos/generate.py

## lint: ruff (rules in pyproject.toml), mypy over every edgeship package, and the import rules
## between the parts (docs/development.md); CI runs it before the tests
lint: $(STAMP)
	$(BIN)/python -m ruff check converters ota toolkit device-agent tests benchmarks examples
	$(BIN)/python .ci/typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py

clean:
	@# an ARM root killed mid-session may still have the host's /dev bound inside: unmount first
	@[ ! -d build/arm ] || bash -c 'source .ci/arm/lib.sh && release_mounts build/arm'
	rm -rf $(VENV) $(TFLITE_VENV) build *.egg-info .pytest_cache
