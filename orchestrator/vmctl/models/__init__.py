"""Model specs, the catalog, the hub cache, downloads and GGUF checks."""
