"""`python tools/reshard.py ...` runs flashmorph.cli.reshard;
installed, the same command is `flashmorph-reshard`."""

from flashmorph.cli.reshard import main

if __name__ == "__main__":
    raise SystemExit(main())
