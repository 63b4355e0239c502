"""The command-line entry points: one module per command, each with `main(argv=None) -> int`, installed as
`flashmorph-*` console scripts; launcher/*.py and tools/*.py are thin shims over them."""
