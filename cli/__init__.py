"""The `gradstream` command line: starts processes, and talks to the API over HTTP."""
