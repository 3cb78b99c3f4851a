"""Command-line interface (typer). The only layer that configures logging and draws bars."""
