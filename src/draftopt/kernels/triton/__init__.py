"""Triton device code and its launchers, one file a kernel (no op registration here: see ../ops/)."""
