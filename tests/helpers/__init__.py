"""Helpers shared by test modules (no test module imports another): synthetic run
directories, tiny-model overrides, servers over loopback, CPU capability checks."""
