"""Command-line helpers shared by the project's entry points (`python -m trainer.task`, ...).

`HelpFormatter` prints an option's default in `--help` only when it tells the reader something:
not for required options, not for defaults of None (their help says what happens instead), not
for flags that are off unless given, and not twice when the help text already explains it.
Importing this module costs nothing (argparse only): `--help` must answer before TensorFlow
is imported.
"""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default:" in text.lower()):
            return text
        return super()._get_help_string(action)
