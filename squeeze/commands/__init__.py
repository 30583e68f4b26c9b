"""CLI commands of the subsystems; each module has `register(app)` called by squeeze.cli."""
