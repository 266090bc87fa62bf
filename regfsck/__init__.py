"""regfsck: offline fsck, garbage collector and exporter for distribution registry data."""

__version__ = "0.1.0"
