"""rsnap: incremental Rust CI builds from content-addressed snapshots."""

__version__ = "0.1.0"
