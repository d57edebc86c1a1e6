"""The errors a user sees, and the one-line form every message of ours takes."""


def first_line(err: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (libraries append detail below it: OmegaConf's
    full_key and types, Ray's traceback), so that our messages stay one line."""
    lines = str(err).strip().splitlines()
    if with_type:
        return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    return lines[0] if lines else type(err).__name__


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, the collective and the layer."""


class ConfigError(ValueError):
    """A user setting is invalid: the message names the setting, its value, the constraint and the fix."""
    fixes: list[dict[str, object]] = []  # suggested changes, each checked to validate (config.fixes.refusal)

    def __init__(self, setting: str, value: object, problem: str) -> None:
        self.setting, self.value, self.problem = setting, value, problem
        super().__init__(f"{setting}={value!r}: {problem}")


class OverrideError(ConfigError):
    """A command-line override is wrong as written: the message quotes the override itself."""
    def __init__(self, override: str, setting: str, problem: str) -> None:
        ValueError.__init__(self, f"{override}: {problem}")
        self.setting, self.value, self.problem, self.override = setting, override, problem, override
