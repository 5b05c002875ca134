# Proxmox CT template of the appliance (docs/install/ct-template.md): scripts/image/build.sh
# provisions a build CT with playbooks/provision.yml, strips every per-instance secret and packs
# dist/image/whisper-appliance-<version>-debian-12_amd64.tar.zst + .sha256 (root, LXC).

TEST_WITH_LXC := 1
TEST_EXTRA += test-image
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
CT_IMAGE := dist/image/whisper-appliance-$(IMAGE_VERSION)-debian-12_amd64.tar.zst

# A wheelhouse older than the code, the lock or the script it was built from is rebuilt first
# (make dist).
dist/wheelhouse/VERSION: $(wildcard $(shell git ls-files appliance pyproject.toml requirements.lock scripts/dist.sh 2>/dev/null))

.PHONY: image
image: dist/wheelhouse/VERSION collections ## Proxmox CT template dist/image/*.tar.zst + .sha256 (root; skipped when up to date)
	@[ "$$(id -u)" = 0 ] || { echo "make image needs root (LXC containers, bridge, NAT)"; exit 1; }
	@start=$$(date +%s); bash scripts/image/build.sh $(CT_IMAGE); \
	  echo "make image: wall time $$(( $$(date +%s) - start )) s"

.PHONY: test-image
test-image: image ## Two CTs from the image: HTTPS /health, a real transcription, no shared secret (root)
	@start=$$(date +%s); $(VENV)/bin/pytest -m image tests/image; rc=$$?; \
	  echo "make test-image: wall time $$(( $$(date +%s) - start )) s"; exit $$rc
