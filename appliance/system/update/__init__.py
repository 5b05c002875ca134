"""Signed releases and the privileged self-updater."""
