# Two commands do all set-up on a fresh machine:
#   make bench   installs and builds what is missing, then runs the main job (overhead benchmark)
#   make test    installs and builds what is missing, then runs the test suite
PYTHON ?= python3
# The CPU build of torch this project is developed against; a torch already installed (e.g. a CUDA
# build on a GPU host, any version >= 2.4) is kept as it is.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
EXT_SUFFIX := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
EXT := offload_ema/_C$(EXT_SUFFIX)

.PHONY: setup deps bench bench-kernels test gpu-wheels

# What each package is for: torch (the library itself; a CPU build unless one is installed),
# setuptools / wheel / ninja (building the C++ kernels), numpy / psutil / safetensors (runtime), pytest
# (the tests), matplotlib (--plot), lightning / transformers / accelerate / diffusers (the
# integrations and their tests), deepspeed (the ZeRO tests). pip runs only for what is missing
# (looked up without importing anything): a set-up machine skips this in well under a second.
PACKAGES := setuptools:setuptools>=64 wheel:wheel ninja:ninja pytest:pytest numpy:numpy psutil:psutil \
	safetensors:safetensors matplotlib:matplotlib lightning:lightning transformers:transformers \
	accelerate:accelerate diffusers:diffusers sklearn:scikit-learn
MISSING = $(shell $(PYTHON) -c "import importlib.util as u, sys; print(' '.join(repr(p.split(':', 1)[1]) for p in sys.argv[1:] if u.find_spec(p.split(':')[0]) is None))" $(foreach p,$(PACKAGES),'$(p)'))

deps:
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	@$(if $(strip $(MISSING)),$(PYTHON) -m pip install -q $(MISSING),true)
	@# DeepSpeed (optional, for its ZeRO tests): built against the torch above, never a second one.
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" || DS_BUILD_OPS=0 $(PYTHON) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"

# Rebuilt only when a source changed; --no-build-isolation builds against the installed torch.
$(EXT): setup.py pyproject.toml $(wildcard csrc/*) | deps
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	@touch $@

setup: deps $(EXT)

bench: setup
	offload-ema bench $(ARGS)

bench-kernels: setup
	$(PYTHON) bench/kernels.py $(ARGS)

test: setup
	$(PYTHON) -m pytest -q tests $(ARGS)

# Wheels the offline GPU machine's image lacks for bench/gpu_check.sh (carried as .wheels/):
# diffusers (the peer modes) and its one requirement the image has not; pure-Python wheels.
DIFFUSERS_SPEC ?= diffusers==0.42.1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		-d .wheels "$(DIFFUSERS_SPEC)" importlib_metadata zipp
