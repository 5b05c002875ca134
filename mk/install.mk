# The one-line Proxmox installer install.sh (docs/install/proxmox.md):
# `make installer` stamps the release version and the CT template's SHA-256 into dist/install.sh,
# the copy published with the release; `make test-install` runs it against the pct stand-in.

LINT_EXTRA += lint-shell
TEST_EXTRA += test-install

INSTALL_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
INSTALL_IMAGE := dist/image/whisper-appliance-$(INSTALL_VERSION)-debian-12_amd64.tar.zst
SHELL_SCRIPTS = $(shell { echo install.sh; git ls-files --cached --others --exclude-standard \
  '*.sh' scripts/pct-standin .ci/run; } 2>/dev/null | grep -v '\.md$$' | sort -u)

.PHONY: lint-shell
lint-shell: setup ## shellcheck over install.sh, every *.sh, .ci/run and the pct stand-in
	$(VENV)/bin/shellcheck -x $(SHELL_SCRIPTS)

.PHONY: installer
installer: image ## dist/install.sh: install.sh pinned to this version and the CT template's SHA-256
	@$(MAKE) --no-print-directory dist/install.sh

dist/install.sh: install.sh $(INSTALL_IMAGE).sha256
	@sha=$$(cut -d' ' -f1 $(INSTALL_IMAGE).sha256); [[ $$sha =~ ^[0-9a-f]{64}$$ ]] || \
	  { echo "no checksum in $(INSTALL_IMAGE).sha256"; exit 1; }; \
	sed -e 's/^RELEASE_VERSION=.*/RELEASE_VERSION="$(INSTALL_VERSION)"/' \
	  -e "s/^RELEASE_SHA256=.*/RELEASE_SHA256=\"$$sha\"/" install.sh >$@.tmp && \
	chmod 0755 $@.tmp && mv $@.tmp $@ && echo "$@: $(INSTALL_VERSION), sha256 $$sha"

.PHONY: test-install
test-install: installer ## install.sh end to end against the pct stand-in, unattended (root, LXC)
	@[ "$$(id -u)" = 0 ] || { echo "test-install needs root (LXC containers, bridge, NAT)"; exit 1; }
	@start=$$(date +%s); $(VENV)/bin/pytest -m install tests/install; rc=$$?; \
	  echo "make test-install: wall time $$(( $$(date +%s) - start )) s"; exit $$rc
