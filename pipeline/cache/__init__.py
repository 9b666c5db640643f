"""The feature cache: fingerprints, the HDF5 store (schema, reading, writing), quarantine, locating caches."""
