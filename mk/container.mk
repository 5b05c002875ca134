# Container image (Dockerfile, compose.yaml) built and tested with podman: docs/install/docker.md.
# Docker Hub may be unreachable: CONTAINER_BASE=local builds the base from Debian's archive
# (mmdebstrap rootfs with python3, python3-venv, ffmpeg -> `podman import`), cached in .cache/.

# make test builds and runs the image too (podman, runc, mmdebstrap from Debian's archive).
TEST_WITH_CONTAINER := 1
TEST_EXTRA += test-container

PODMAN ?= podman
# crun refuses this host's hybrid cgroups; runc works with both layouts.
PODMAN_RUNTIME ?= runc
IMAGE ?= localhost/whisper-appliance:latest
CONTAINER_BASE ?= local
LOCAL_BASE_IMAGE := localhost/wa-base:bookworm
LOCAL_BASE_TAR := .cache/container/wa-base-bookworm.tar
DEBIAN_MIRROR ?= http://deb.debian.org/debian
ifeq ($(CONTAINER_BASE),local)
IMAGE_BASE := $(LOCAL_BASE_IMAGE)
IMAGE_BASE_DEP := image-docker-base
IMAGE_PULL := never
else
IMAGE_BASE := $(CONTAINER_BASE)
IMAGE_BASE_DEP :=
IMAGE_PULL := missing
endif

$(LOCAL_BASE_TAR):
	@command -v mmdebstrap >/dev/null || { echo "mmdebstrap missing: apt-get install mmdebstrap"; exit 1; }
	mkdir -p $(@D)
	mmdebstrap --variant=apt --include=python3,python3-venv,ffmpeg,ca-certificates \
	  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
	  bookworm $@.tmp.tar $(DEBIAN_MIRROR)
	mv $@.tmp.tar $@

.PHONY: image-docker-base
image-docker-base: ## Local Debian 12 base image (python3, ffmpeg) from Debian's archive, for offline builds
	@if ! $(PODMAN) image exists $(LOCAL_BASE_IMAGE); then \
	  $(MAKE) --no-print-directory $(LOCAL_BASE_TAR) && \
	  $(PODMAN) import --change 'CMD ["/bin/bash"]' $(LOCAL_BASE_TAR) $(LOCAL_BASE_IMAGE); \
	fi

dist/wheelhouse/VERSION:
	$(MAKE) --no-print-directory dist

.PHONY: image-docker
image-docker: dist/wheelhouse/VERSION $(IMAGE_BASE_DEP) ## Container image from the wheelhouse (CONTAINER_BASE=docker.io/library/python:3.11-slim-bookworm: official base)
	$(PODMAN) build --runtime $(PODMAN_RUNTIME) --format docker --pull=$(IMAGE_PULL) \
	  --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) -f Dockerfile .

.PHONY: test-container
test-container: dist/wheelhouse/VERSION $(IMAGE_BASE_DEP) ## Build the image with podman, run it, transcribe a clip, check user and healthcheck (root)
	WA_IMAGE_BASE=$(IMAGE_BASE) PODMAN_RUNTIME=$(PODMAN_RUNTIME) \
	  $(VENV)/bin/pytest -m container tests/container

# Signed update release (docs/operate/updates.md): dist/release/{manifest.json,.sig,tarball}.
RELEASE_KEY ?=
.PHONY: release
release: dist/wheelhouse/VERSION ## Sign dist/wheelhouse as an update release in dist/release (RELEASE_KEY=private key; BUNDLE=1: one upload file)
	@[ -n "$(RELEASE_KEY)" ] || { echo "set RELEASE_KEY (make one: $(PY) -m appliance.release keygen KEY.pem)"; exit 2; }
	$(PY) -m appliance.release build --wheelhouse dist/wheelhouse --out dist/release \
	  --key $(RELEASE_KEY) $(if $(filter 1,$(BUNDLE)),--bundle)
