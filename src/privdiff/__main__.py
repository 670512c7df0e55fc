from privdiff.cli import run

run()
