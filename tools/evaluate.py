"""`python tools/evaluate.py ...` runs flashmorph.cli.evaluate;
installed, the same command is `flashmorph-evaluate`."""

from flashmorph.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
