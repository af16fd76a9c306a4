"""The gallery: an SQLite index of every saved image (store.py) and readers for other tools' metadata (importers.py)."""
