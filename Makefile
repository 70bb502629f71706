# Two commands do everything on a fresh machine: `make demo` and `make test` (each creates .venv as needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# ray is an optional extra of the package (analyses/distributed.py); the tests run a local instance.
# torch is named in the same pip command as transformer-lens and nnsight, or pip would pick a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEPS   := "$(TORCH)" "transformers>=5.9,<6" "transformer-lens>=4.3,<5" "nnsight>=0.8" accelerate safetensors \
          einops jaxtyping tqdm pytest matplotlib pillow "decord==0.6.0" av soundfile "gguf==0.19.0" \
          nbformat nbclient ipykernel "ray>=2.9"
# tinysoundfont's only dependency (pyaudio) does not build without portaudio and is not needed to render audio
NODEPS := "tinysoundfont==0.3.7"

.PHONY: demo test install clean organism

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(DEPS)
	$(BIN)/pip install --no-deps $(NODEPS)
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/fetch_assets.py
	touch $(STAMP)

# the organism checkpoint is (re)assembled when the committed deltas changed (seconds; a no-op otherwise)
demo: $(STAMP)
	$(BIN)/python scripts/build_organism.py
	$(BIN)/hooked-av demo --out runs/demo

# train the organism's towers and adapters (80 min to 2 h on 2 cores; resumable); commit model_zoo/organism_deltas
organism: $(STAMP)
	$(BIN)/python scripts/train_organism.py
	$(BIN)/python scripts/build_organism.py

test: $(STAMP)
	$(BIN)/python scripts/build_organism.py
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
