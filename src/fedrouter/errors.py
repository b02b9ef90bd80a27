"""The one error type for bad input from a user: config, data, model names, client updates."""


class FedrouterError(Exception):
    """A problem with what the user gave us, told in one line; the CLI prints it and exits with code 2."""
