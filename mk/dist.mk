# Offline distribution: the appliance wheel + every locked dependency wheel (scripts/dist.sh).

.PHONY: dist
dist: setup ## Build dist/wheelhouse: appliance + locked dependency wheels (offline install)
	bash scripts/dist.sh
