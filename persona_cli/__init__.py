"""The `persona` command line: parses options, calls recipes/ and store/, renders results."""
