"""LiteFS: a FUSE filesystem that replicates SQLite databases across a cluster."""

__version__ = "0.1.0"
