"""Gluon device code for Hopper (sm_90) and its launchers (no op registration here: see ../ops/)."""
