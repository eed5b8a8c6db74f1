"""storage_schema package."""
