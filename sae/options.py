"""One formatter for messages about arguments, for two audiences.

A library function that rejects an argument raises `OptionError(parameter, template, **values)`: the
template names the argument as `{option}`. Printed as is (`str(error)`), that is the parameter as a
Python caller writes it (`fmt=`); the command line renders the same error with its own table of
parameter -> flag (`error.render({"fmt": "--format"})`), so a CLI user reads `--format`.
"""

from __future__ import annotations

from typing import Mapping


class OptionError(ValueError):
    """A bad argument value; the message names the argument through `{option}` (see module docstring)."""

    def __init__(self, parameter: str, template: str, **values):
        self.parameter, self.template, self.values = parameter, template, values
        super().__init__(self.render())

    def render(self, option_names: Mapping[str, str] | None = None) -> str:
        """The message with the argument named as `option_names[parameter]`, else as `parameter=`."""
        name = (option_names or {}).get(self.parameter, f"{self.parameter}=")
        return self.template.format(option=name, **self.values)


def render_error(error: BaseException, option_names: Mapping[str, str] | None = None) -> str:
    """The message of any exception; an OptionError names its argument as `option_names` say."""
    return error.render(option_names) if isinstance(error, OptionError) else str(error)
