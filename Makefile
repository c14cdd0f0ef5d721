# immuta: `make demo` and `make test` do everything, including installing what is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PG_BIN        := /usr/lib/postgresql/15/bin
PG_CONFIG     := $(PG_BIN)/pg_config
PGRX_VERSION  := 0.18.1
APT_PACKAGES  := postgresql-15 postgresql-server-dev-15 postgresql-15-cron clang libclang-dev sudo pkg-config
DEMO_DIR      ?= /tmp/immuta-demo
DEMO_PORT     ?= 5499
PGTEST_DIR    := /tmp/immuta-pgtest

# cargo-pgrx builds with this extra setting; giving plain cargo the same one lets the unit,
# in-backend and system tiers share one debug build of the dependencies (the AWS SDK among them)
# instead of building them three times.
PGRX_LINK := --config "target.'cfg(all(target_family = \"unix\", not(target_os = \"macos\")))'.rustflags = [\"-C\", \"link-arg=-Wl,--no-gc-sections\"]"

IS_ROOT := $(filter 0,$(shell id -u))
SUDO    := $(if $(IS_ROOT),,sudo)
AS_PG   := $(if $(IS_ROOT),runuser -u postgres --,sudo -u postgres)
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: help prereqs install demo demo-stop test test-unit test-backend test-system bench clean

help:
	@echo "make demo   install prerequisites, build and install immuta, start a demo cluster, run a walkthrough"
	@echo "make test   install prerequisites, run every test tier (unit, in-backend, system)"
	@echo "make bench  install, then measure immuta against the function-call floor, pgcrypto, pgbench (bench/run.sh)"

## Prerequisites: Debian packages, cargo-pgrx $(PGRX_VERSION), pgrx pointed at Debian's PostgreSQL 15,
## and moto (AWS KMS on loopback, for the tests) in .venv.
prereqs:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@if ! cargo pgrx --version 2>/dev/null | grep -q " $(PGRX_VERSION)$$"; then \
	    echo "installing cargo-pgrx $(PGRX_VERSION)"; \
	    cargo install cargo-pgrx --version $(PGRX_VERSION) --locked; \
	fi
	@if ! grep -qs '^pg15 *= *"$(PG_CONFIG)"' $${PGRX_HOME:-$$HOME/.pgrx}/config.toml; then \
	    cargo pgrx init --pg15 $(PG_CONFIG); \
	fi
	@if ! cmp -s tests/kms/requirements.txt .venv/requirements.txt; then \
	    echo "installing moto's KMS server for the tests into .venv"; \
	    python3 -m venv .venv; \
	    .venv/bin/pip install -q -r tests/kms/requirements.txt; \
	    cp tests/kms/requirements.txt .venv/requirements.txt; \
	fi

## Build (release) and install into Debian's PostgreSQL 15.
install: prereqs
	cargo pgrx install --release --pg-config $(PG_CONFIG)

## A local cluster with immuta preloaded, and a walkthrough in psql.
demo: install
	@if $(AS_PG) $(PG_BIN)/pg_ctl -D $(DEMO_DIR)/data status >/dev/null 2>&1; then \
	    echo "restarting the demo cluster in $(DEMO_DIR) to load the new build"; \
	    $(AS_PG) $(PG_BIN)/pg_ctl -D $(DEMO_DIR)/data -l $(DEMO_DIR)/server.log -w restart >/dev/null; \
	else \
	    rm -rf $(DEMO_DIR); mkdir -p $(DEMO_DIR); chown postgres: $(DEMO_DIR) 2>/dev/null || $(SUDO) chown postgres: $(DEMO_DIR); \
	    $(AS_PG) $(PG_BIN)/initdb -D $(DEMO_DIR)/data -E UTF8 --locale=C -A trust -U postgres >/dev/null; \
	    { cat pgrx-config/postgresql.demo.conf; \
	      echo "unix_socket_directories = '$(DEMO_DIR)'"; echo "port = $(DEMO_PORT)"; } \
	      | $(AS_PG) tee -a $(DEMO_DIR)/data/postgresql.conf >/dev/null; \
	    $(AS_PG) $(PG_BIN)/pg_ctl -D $(DEMO_DIR)/data -l $(DEMO_DIR)/server.log -w start >/dev/null; \
	fi
	$(PG_BIN)/psql -X -h $(DEMO_DIR) -p $(DEMO_PORT) -U postgres -d postgres -f docs/walkthrough.sql
	@echo
	@echo "The demo cluster is running (data in $(DEMO_DIR)/data, log in $(DEMO_DIR)/server.log)."
	@echo "Connect:  $(PG_BIN)/psql -h $(DEMO_DIR) -p $(DEMO_PORT) -U postgres immuta_demo"
	@echo "Stop:     make demo-stop"

demo-stop:
	-$(AS_PG) $(PG_BIN)/pg_ctl -D $(DEMO_DIR)/data -w stop

## Every test tier; non-zero exit on any failure.
test: prereqs test-unit test-backend test-system

## Unit tier: the pure core, no server.
test-unit:
	cargo test $(PGRX_LINK) -p immuta-core

## In-backend tier: #[pg_test]s in a temporary cluster run by cargo-pgrx as `postgres`.
test-backend:
	mkdir -p $(PGTEST_DIR) && chown postgres: $(PGTEST_DIR) 2>/dev/null || $(SUDO) chown postgres: $(PGTEST_DIR)
	cargo pgrx test pg15 pg_tests:: --runas postgres --pgdata $(PGTEST_DIR)/data

## System tier: real clusters started by the tests (tests/), against the installed release build.
test-system: install
	cargo test $(PGRX_LINK) -p immuta --test '*' -- --test-threads=2

## Benchmarks (not tests): results in bench/results/latest.txt.
bench: install
	bash bench/run.sh

clean:
	cargo clean
	rm -rf $(PGTEST_DIR)
