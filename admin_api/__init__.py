"""Litestar admin API (catalog, versions, detection) — filled by the admin-plane issue."""
