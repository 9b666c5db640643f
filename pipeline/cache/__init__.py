"""The feature cache: fingerprints, the HDF5 store (reading and writing apart), quarantine, locating caches."""
