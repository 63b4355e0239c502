"""`python tools/export.py ...` runs flashmorph.cli.export;
installed, the same command is `flashmorph-export`."""

from flashmorph.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
