"""`python tools/estimate.py ...` runs flashmorph.cli.estimate;
installed, the same command is `flashmorph-estimate`."""

from flashmorph.cli.estimate import main

if __name__ == "__main__":
    raise SystemExit(main())
