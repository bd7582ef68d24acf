"""The process: the `rnnserve` command, settings from flags, logging, serving both front-ends."""
