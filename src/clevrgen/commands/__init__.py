"""One thin file per command: parse options, load the config, call the library, print a summary."""
