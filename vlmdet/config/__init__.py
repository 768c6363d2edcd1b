"""The configuration: the settings and their checks (settings.py), the shipped presets (presets/*.yaml),
the speed profiles a run resolves train.profile to (profiles.py), and the one parser of `kind:rest` specs."""
