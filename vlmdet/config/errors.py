"""The configuration's error: raised for a mistake the user makes in a setting, a preset or a spec."""


class ConfigError(ValueError):
    """A user-facing configuration mistake: the message names the field, the value and the fix."""
