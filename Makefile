# Two entry points (see README): `make run` and `make test`. Everything else is what they build on.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
DEMO_BUNDLE := examples/functions/realtime-demo/page/realtime-js.js
# Root in CI and on fresh machines; sudo elsewhere when it exists.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: setup run test lint system-deps node-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start one worker on the embedded default (single node, no Redis) with the examples deployed.
run: setup $(DEMO_BUNDLE)
	$(BIN)/mbworker serve --deploy examples/functions

## The realtime demo's browser bundle of realtime-js (from npm, built here: workers fetch nothing). Not fatal:
## without it the other examples still run and the demo page says what is missing.
$(DEMO_BUNDLE): examples/functions/realtime-demo/client.ts examples/functions/realtime-demo/build.sh | $(STAMP)
	DENO=$(BIN)/deno sh examples/functions/realtime-demo/build.sh || echo "warning: realtime-demo bundle not built"

## System packages the tests talk to for real: redis-server, chromium, node + npm; systemd-nspawn, mmdebstrap and
## nftables for the machines provider's tests (cluster nodes booted as machines on this host).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	command -v cloud-init >/dev/null 2>&1 || missing="$$missing cloud-init"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	command -v mmdebstrap >/dev/null 2>&1 || missing="$$missing mmdebstrap"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	[ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

node-deps:
	@for d in tests/e2e bench/node; do \
	  if [ -f $$d/package-lock.json ]; then (cd $$d && npm ci --no-audit --no-fund --loglevel=error); fi; \
	done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## Install everything the tests need, then run the whole suite.
test: setup system-deps node-deps lint
	$(BIN)/pytest

## Every bench in turn; floor_server.py and forward_floor.py are servers (functions.py starts them), not benches.
bench: setup
	@for b in bench/*.py; do case $$b in */_*|*/floor_server.py|*/forward_floor.py) continue;; esac; echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .mbworker .pytest_cache .mypy_cache .ruff_cache $(DEMO_BUNDLE)
