"""Command-line entry points: dfdaemon, dfget and dfctl."""
