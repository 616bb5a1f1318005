"""The tools built on the library: the command line, demo, send/listen, benchmarks and capture inspection."""
