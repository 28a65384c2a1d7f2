"""Run plumbing that ``train.py`` calls: checking a config before anything is written, the run
folder's lock, checkpoints, and the outputs of a finished run. Nothing here is a plugin: a user's
own Lightning code imports ``plugins``, never ``runner``."""
