"""Settings: the typed configuration, presets, the command line and the
checks that run before anything is built."""
