# Ansible side: collections, lint, molecule (real LXC containers; run as root).

TEST_WITH_LXC := 1
LINT_EXTRA += lint-ansible
TEST_EXTRA += molecule

# PyPI's `ansible` package bundles the collections pinned in requirements.yml; Galaxy may be
# unreachable, PyPI is not. The extraction checks every pinned version against the bundle.
ANSIBLE_BUNDLE ?= ansible==12.3.0
ANSIBLE_FILES := site.yml playbooks inventory roles molecule requirements.yml

define EXTRACT_COLLECTIONS
import json, shutil, sys, zipfile, pathlib, yaml
wheel, reqs, dest = sys.argv[1:4]
zf = zipfile.ZipFile(wheel)
dest = pathlib.Path(dest) / "ansible_collections"
for c in yaml.safe_load(open(reqs))["collections"]:
    ns, name = c["name"].split(".")
    prefix = f"ansible_collections/{ns}/{name}/"
    meta = json.loads(zf.read(prefix + "MANIFEST.json"))["collection_info"]
    if meta["version"] != str(c["version"]):
        sys.exit(f"{c['name']}: requirements.yml pins {c['version']}, {wheel} bundles {meta['version']}")
    shutil.rmtree(dest / ns / name, ignore_errors=True)
    for member in zf.namelist():
        if member.startswith(prefix):
            zf.extract(member, dest.parent)
    print(f"  {c['name']} {meta['version']}")
endef
export EXTRACT_COLLECTIONS

.PHONY: collections
collections: collections/.installed ## Install the collections pinned in requirements.yml into ./collections
collections/.installed: requirements.yml mk/ansible.mk
	@[ -x $(PY) ] || $(MAKE) --no-print-directory setup
	rm -rf .cache/ansible-bundle
	$(VENV)/bin/pip download -q --no-deps -d .cache/ansible-bundle '$(ANSIBLE_BUNDLE)'
	$(PY) -c "$$EXTRACT_COLLECTIONS" .cache/ansible-bundle/*.whl requirements.yml collections
	touch $@

.PHONY: lint-ansible
lint-ansible: collections ## ansible-lint (production profile) and yamllint over the Ansible files
	$(VENV)/bin/yamllint --strict $(ANSIBLE_FILES)
	$(VENV)/bin/ansible-lint

# `make test` runs these; scenario `cluster` (real appliance nodes under load, the cluster's
# acceptance: throughput of two nodes against one) wants a quiet machine and runs on its own.
MOLECULE_SCENARIOS := default proxmox cluster-standin

.PHONY: molecule
molecule: collections dist ## Molecule on real LXC containers, scenarios default + proxmox + cluster-standin side by side (root)
	@[ "$$(id -u)" = 0 ] || { echo "molecule needs root (LXC containers, bridge, NAT)"; exit 1; }
	bash molecule/run.sh $(MOLECULE_SCENARIOS)

.PHONY: molecule-cluster
molecule-cluster: collections dist ## Molecule scenario cluster alone: PostgreSQL, HAProxy, two real appliance nodes under load, rolling update (root, ~15 min, quiet machine)
	@[ "$$(id -u)" = 0 ] || { echo "molecule needs root (LXC containers, bridge, NAT)"; exit 1; }
	bash molecule/run.sh cluster
