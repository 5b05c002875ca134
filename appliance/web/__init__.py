"""The Quart application: app factory, server, routes, UI."""
