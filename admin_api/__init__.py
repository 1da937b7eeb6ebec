"""Litestar admin API (catalog, versions, detection): the admin-plane issue."""
