class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, the collective and the layer."""


class ConfigError(ValueError):
    """A user setting is invalid: the message names the setting, its value, the constraint and the fix."""
    def __init__(self, setting: str, value: object, problem: str) -> None:
        self.setting, self.value, self.problem = setting, value, problem
        super().__init__(f"{setting}={value!r}: {problem}")
