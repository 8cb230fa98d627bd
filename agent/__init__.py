"""deadlock-agent: a sidecar that watches Gunicorn workers for known hangs."""

__version__ = "0.1.0"
