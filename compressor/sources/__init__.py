"""Sources and data: model folders, examples, GGUF files, the cache, data sets and the real inputs built from them."""
