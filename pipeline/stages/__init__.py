"""The pipeline's stages. Each is one module with one entry function; no stage imports another."""
