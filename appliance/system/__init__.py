"""The host side: settings, CLI, logging, certificates, the self-updater."""
