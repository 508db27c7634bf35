"""The command line: thin. Parse, call a plain function, print."""
