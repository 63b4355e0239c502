"""`python tools/discretize_gates.py ...` runs flashmorph.cli.discretize_gates;
installed, the same command is `flashmorph-discretize`."""

from flashmorph.cli.discretize_gates import main

if __name__ == "__main__":
    raise SystemExit(main())
