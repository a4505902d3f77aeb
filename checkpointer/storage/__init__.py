"""Where bytes live: URLs, local folders, fsspec, the Hub, publishing."""
