"""Flower entry points and glue: ServerApp, ClientApp, strategy, record conversion."""
