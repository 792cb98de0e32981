"""Attack commands (`attack`, `transfer-matrix`)."""
