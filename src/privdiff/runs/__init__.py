"""Run folders: atomic writes and checkpoints (`files`), the run record (`record`), one writer at a
time (`lock`), and the folder contract of each kind of run, written and read in one place (`folder`)."""
