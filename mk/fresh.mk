# Fresh-machine proof (docs/develop/tests.md): every command and host file the Makefile,
# scripts and tests use resolves in a minimal Debian 12 rootfs that has only bootstrap.sh's
# packages (scripts/check_fresh_machine.sh, scripts/check_commands.py).

TEST_EXTRA += test-fresh

.PHONY: test-fresh
test-fresh: setup ## Check bootstrap.sh's package list in a minimal Debian 12 rootfs (root)
	@start=$$(date +%s); bash scripts/check_fresh_machine.sh; rc=$$?; \
	  echo "make test-fresh: wall time $$(( $$(date +%s) - start )) s"; exit $$rc
